"""Block-wise application of per-language affine maps (the transform kernels).

Every transform of the package is ``y = ((x - shift[l]) * scale[l]) @ W[l] + offset``
for the row's language ``l``, with some of the parts absent.  These kernels run it
in row blocks on torch tensors (CPU or CUDA), writing into one preallocated output:
memory is the output plus one block, the caller's array is never modified, and a
non-finite value anywhere raises a clear error instead of propagating.
"""

from __future__ import annotations

import numpy as np
import torch

from ._stats import row_blocks
from ._validation import raise_non_finite

__all__ = ["affine_by_language", "project_out"]


def _empty_like(T: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An output buffer; on the CPU through numpy, whose large allocations use huge
    pages (faulting 600 MB in 4 KiB pages through ``torch.empty`` cost ~4x more)."""
    if T.device.type == "cpu":
        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        return torch.from_numpy(np.empty(tuple(T.shape), dtype=np_dtype))
    return torch.empty(T.shape, dtype=dtype, device=T.device)


def _check_block(out_block: torch.Tensor, T: torch.Tensor, sl: slice, name: str) -> None:
    if not bool(torch.isfinite(out_block.sum())):
        raise_non_finite(T[sl], name, offset=sl.start)


def affine_by_language(
    T: torch.Tensor,
    gcodes: np.ndarray,
    *,
    shift: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    rotations: dict[int, np.ndarray] | None = None,
    offset: np.ndarray | None = None,
    name: str = "X",
) -> torch.Tensor:
    """Apply ``((x - shift[g]) * scale[g]) @ R[g] + offset`` row-wise.

    Parameters
    ----------
    T : tensor of shape (n, d)
        Input rows (not modified).
    gcodes : ndarray of shape (n,)
        Row's index into ``shift``/``scale``/``rotations``.
    shift, scale : ndarray of shape (L, d), optional
        Per-language vectors (float64; cast to the working dtype).
    rotations : dict {index: ndarray (d, d)}, optional
        Per-language right-multiplied maps; languages absent from the dict are
        not rotated.
    offset : ndarray of shape (d,), optional
        Added to every output row.
    """
    dev = T.device
    cdt = T.dtype if T.dtype in (torch.float32, torch.float64) else torch.float64
    g = torch.from_numpy(np.ascontiguousarray(gcodes, dtype=np.int64)).to(dev)
    sh = None if shift is None else torch.from_numpy(shift).to(dev, cdt)
    sc = None if scale is None else torch.from_numpy(scale).to(dev, cdt)
    off = None if offset is None else torch.from_numpy(offset).to(dev, cdt)
    out = _empty_like(T, cdt)
    for sl in row_blocks(T.shape[0]):
        gb = g[sl]
        ob = out[sl]
        if sh is not None:
            torch.sub(T[sl], sh.index_select(0, gb), out=ob)
        else:
            ob.copy_(T[sl])
        if sc is not None:
            ob.mul_(sc.index_select(0, gb))
        _check_block(ob, T, sl, name)
    if rotations:
        for lang, R in rotations.items():
            rows = torch.nonzero(g == lang).flatten()
            if rows.numel() == 0:
                continue
            Rt = torch.from_numpy(R).to(dev, cdt)
            for sl in row_blocks(rows.numel()):
                idx = rows[sl]
                out[idx] = out.index_select(0, idx) @ Rt
    if off is not None:
        out += off
    return out


def project_out(
    T: torch.Tensor, basis: np.ndarray, *, center: np.ndarray | None = None, name: str = "X"
) -> torch.Tensor:
    """Remove the span of ``basis`` (k, d orthonormal rows) from every row.

    Computes ``x - ((x - c) B^T) B`` in row blocks, i.e. the orthogonal projection
    onto the complement of span(B) through the point ``c`` (``c = 0`` if None), at
    cost O(n d k) without forming the d x d projector.
    """
    dev = T.device
    cdt = T.dtype if T.dtype in (torch.float32, torch.float64) else torch.float64
    B = torch.from_numpy(np.ascontiguousarray(basis)).to(dev, cdt)
    c = None if center is None else torch.from_numpy(center).to(dev, cdt)
    out = _empty_like(T, cdt)
    for sl in row_blocks(T.shape[0]):
        x = T[sl].to(cdt)
        ob = out[sl]
        if B.shape[0]:
            coef = (x - c) @ B.T if c is not None else x @ B.T
            torch.sub(x, coef @ B, out=ob)
        else:
            ob.copy_(x)
        _check_block(ob, T, sl, name)
    return out
