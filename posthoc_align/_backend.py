"""The thin array layer: numpy and torch (CPU or CUDA) behind one compute path.

Every estimator computes through :mod:`torch`, which is a hard dependency of the
package.  A numpy array is viewed as a CPU tensor without a copy
(``torch.from_numpy``), so the statistics and the transforms are written once and
run unchanged on numpy input, on CPU tensors and on CUDA tensors.  This module is
the only place in the package that looks at the type of an array.

Why torch for numpy input?  Per-language reductions need a segmented sum
(``index_add_``), which torch runs multi-threaded at memory speed while numpy has
no equivalent (``np.add.at`` is ~50x slower, one-hot products cost O(L) more
flops).  One code path also means the GPU gives the CPU result by construction.
Dask arrays are handled by :mod:`posthoc_align._dask` (block-wise statistics
reduced in a tree, then the same closed form).

Examples
--------
>>> import numpy as np
>>> from posthoc_align._backend import backend_for
>>> X = np.ones((3, 2), dtype=np.float32)
>>> nx = backend_for(X)
>>> nx.name
'numpy'
>>> T = nx.to_torch(X, "cpu")
>>> nx.from_torch(T * 2, like=X).dtype
dtype('float32')
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = [
    "Backend",
    "backend_for",
    "resolve_device",
    "compute_dtype",
    "block_rows",
    "DEVICE_CONSTRAINT",
    "HALF_DTYPES",
]

#: scikit-learn parameter constraint for ``device=`` parameters.
DEVICE_CONSTRAINT = [str, torch.device, None]


def _kind(a: Any) -> str:
    if isinstance(a, torch.Tensor):
        return "torch"
    mod = type(a).__module__.split(".")[0]
    if mod == "dask":
        return "dask"
    return "numpy"


class Backend:
    """Converts arrays of one library to torch tensors and back.

    Parameters
    ----------
    name : {"numpy", "torch"}
        The library of the caller's arrays.
    """

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"

    # -- conversion -----------------------------------------------------------
    def to_torch(self, X: Any, device: str | torch.device | None = None) -> torch.Tensor:
        """View ``X`` as a tensor on ``device`` (no copy when already there)."""
        if self.name == "torch":
            # the fits and kernels are not differentiable (closed forms, out= buffers,
            # compiled loops): tensors that require grad are read, never traced
            T = X.detach()
        else:
            A = np.asarray(X)
            # torch wants writeable memory (we never write) and no negative strides
            if not A.flags.writeable or any(st < 0 for st in A.strides):
                A = A.copy()
            T = torch.from_numpy(A)
        if device is not None and T.device != torch.device(device):
            T = T.to(device, non_blocking=False)
        return T

    def from_torch(self, T: torch.Tensor, like: Any) -> Any:
        """Return ``T`` as the caller's array type (device of ``like`` for torch).

        A half-precision ``like`` (float16, or bfloat16 for tensors) was computed in a
        wider dtype: the result is cast back to it, so half precision in gives half
        precision out (as scikit-learn's ``StandardScaler`` keeps float16). float32 and
        float64 results are returned without a copy.
        """
        if self.name == "torch":
            T = T.to(like.device) if T.device != like.device else T
            return _to_half(T, like.dtype) if like.dtype in HALF_DTYPES else T
        T = T.detach()
        if getattr(like, "dtype", None) == np.float16:
            T = _to_half(T, torch.float16)
        return T.cpu().numpy()

    def asnumpy(self, X: Any) -> np.ndarray:
        """A host numpy view or copy of ``X``."""
        if self.name == "torch":
            return X.detach().cpu().numpy()
        return np.asarray(X)

    def device_of(self, X: Any) -> torch.device:
        return X.device if self.name == "torch" else torch.device("cpu")


_BACKENDS = {"numpy": Backend("numpy"), "torch": Backend("torch")}

#: Half-precision tensor dtypes: computed in a wider dtype (see :func:`compute_dtype`),
#: the output cast back to them.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _to_half(T: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``T`` cast to the half-precision ``dtype``; an error if a value overflows it."""
    if T.dtype == dtype:
        return T
    H = T.to(dtype)
    # the result was finite (the kernels check it): only the narrowing can overflow
    if not bool(torch.isfinite(H).all()):
        name = str(dtype).removeprefix("torch.")
        big = float(T.abs().max())
        raise ValueError(
            f"The output (largest |value| {big:.3g}) overflows {name}, the dtype of the "
            f"input it is returned in (largest finite {torch.finfo(dtype).max:.3g}). Pass "
            "float32 input instead (X.float() for a tensor, X.astype(np.float32) for an "
            "array); the result is then returned in float32."
        )
    return H


def backend_for(*arrays: Any) -> Backend:
    """The backend of the given arrays (``None`` skipped); mixed types are an error."""
    kinds = {_kind(a) for a in arrays if a is not None}
    if not kinds:
        return _BACKENDS["numpy"]
    if len(kinds) != 1:
        raise TypeError(
            f"mixed array types {sorted(kinds)}; convert all arrays to one library first"
        )
    kind = kinds.pop()
    if kind == "dask":
        raise TypeError(
            "dask arrays are handled block-wise by posthoc_align._dask; "
            "this code path received one directly"
        )
    return _BACKENDS[kind]


def resolve_device(device: str | torch.device | None, nx: Backend, X: Any) -> torch.device:
    """The torch device on which to compute.

    ``"auto"`` (or ``None``) keeps a tensor on its own device and sends numpy
    input to CUDA when one is available, else the CPU.  ``"cuda"`` without a GPU
    is an error, not a silent fallback.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        if nx.name == "torch":
            return X.device
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device={device!r} is not a torch device; use 'auto', 'cpu', 'cuda' or "
            "'cuda:N' (or a torch.device)."
        ) from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(
            f"device={device!r}: only 'cpu' and 'cuda' devices are supported (or 'auto')."
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was requested but torch sees no CUDA GPU "
            f"(torch {torch.__version__}, cuda available: False). "
            "Use device='cpu' or device='auto'."
        )
    return dev


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Working precision for blocks: float32 and float64 kept, everything else float64."""
    if dtype in (torch.float32, torch.float64):
        return dtype
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return torch.float64


#: Blocks are this many times taller on a GPU: there is no CPU cache to stay in, and
#: every block costs kernel launches (on an H200 a 2048-row block of the segmented
#: sums left the GPU idle between launches).
GPU_BLOCK_FACTOR = 16


def block_rows(rows: int, device: torch.device) -> int:
    """Rows per block on ``device``: the CPU's cache-sized ``rows``, taller on a GPU."""
    return rows if device.type == "cpu" else rows * GPU_BLOCK_FACTOR


def output_numpy_dtype(dtype: np.dtype) -> np.dtype:
    """Output dtype for numpy input: float16/32/64 kept, others become float64."""
    dtype = np.dtype(dtype)
    if dtype in (np.float16, np.float32, np.float64):
        return dtype
    return np.dtype(np.float64)
