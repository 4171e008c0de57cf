"""Forward hooks on transformer blocks: find the blocks, read or replace their states.

Two users: :class:`~posthoc_align.encoders.HFEncoder` pools every hidden state inside the
forward pass (:func:`tapping`), or collects them (:func:`collecting`) when a model does not return
``hidden_states``, and :class:`~posthoc_align.encoders.AlignedEncoder` rewrites the states of one
layer inside the model (``propagate=True``). Hidden state ``0`` is the input of the first block (the embedding output) and
hidden state ``i >= 1`` is the output of block ``i - 1``, as in ``transformers``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

# Attribute paths of the block list in common architectures, most specific first.
_KNOWN_BLOCK_LISTS = ("encoder.layer", "encoder.layers", "layers", "h", "blocks", "layer", "block")


def find_layer_modules(model: nn.Module, n_layers: int | None = None) -> nn.ModuleList:
    """Return the list of transformer blocks of ``model``.

    The block list is the ``nn.ModuleList`` of length ``n_layers`` (any length when ``None``) whose
    name ends with a known path (``encoder.layer``, ``h``, ``layers``, ...); failing that, the first
    such list in module order, or the longest one when ``n_layers`` is ``None``.
    """
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
        if n_layers is None or len(module) == n_layers
    ]
    if not candidates:
        raise ValueError(
            f"cannot find the transformer blocks of {type(model).__name__}: no nn.ModuleList "
            f"with {n_layers} modules; pass a transformers model with a standard layout"
        )
    for suffix in _KNOWN_BLOCK_LISTS:
        for name, module in candidates:
            if name == suffix or name.endswith("." + suffix):
                return module
    if n_layers is None:
        return max(candidates, key=lambda item: len(item[1]))[1]
    return candidates[0][1]


def first_tensor(output: object) -> torch.Tensor:
    """The hidden-state tensor in a block's output: a tensor, a tuple's first item or a ModelOutput's."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    values = getattr(output, "values", None)  # transformers ModelOutput is an OrderedDict
    if callable(values):
        for value in values():
            if isinstance(value, torch.Tensor):
                return value
    raise TypeError(f"cannot find a hidden-state tensor in a block output of type {type(output)}")


def replace_first_tensor(output: object, new: torch.Tensor) -> object:
    """``output`` with its hidden-state tensor replaced by ``new``, same container type."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    keys = getattr(output, "keys", None)
    if callable(keys):
        for key in keys():
            if isinstance(output[key], torch.Tensor):
                output[key] = new  # a fresh object from the block: safe to update in place
                return output
    raise TypeError(f"cannot replace the hidden states in a block output of type {type(output)}")


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-state input of a block call (first positional argument or ``hidden_states=``)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    raise TypeError("cannot find the hidden-state input of the first transformer block")


def replace_block_input(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a block call with the hidden-state input replaced by ``new``."""
    if args and isinstance(args[0], torch.Tensor):
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


def register_state_hook(
    layers: nn.ModuleList,
    layer: int,
    fn: Callable[[torch.Tensor], torch.Tensor | None],
    *,
    prepend: bool = False,
) -> torch.utils.hooks.RemovableHandle:
    """Call ``fn(states)`` on hidden state ``layer`` each forward pass; a tensor it returns replaces it.

    Layer ``0`` hooks the input of block 0 (a forward pre-hook), layer ``i`` the output of block
    ``i - 1`` (a forward hook). Returns the removable handle.
    """
    if layer == 0:

        def pre_hook(module, args, kwargs):
            new = fn(block_input(args, kwargs))
            return None if new is None else replace_block_input(args, kwargs, new)

        return layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=prepend)

    def hook(module, args, output):
        new = fn(first_tensor(output))
        return None if new is None else replace_first_tensor(output, new)

    return layers[layer - 1].register_forward_hook(hook, prepend=prepend)


@contextmanager
def hooks_removed_after(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[list]:
    """Yield ``handles`` (append to it inside) and remove every hook on exit, even on error."""
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()
        handles.clear()


@contextmanager
def collecting(layers: nn.ModuleList, wanted: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record hidden states ``wanted`` (indices ``0..len(layers)``) into the yielded dict."""
    store: dict[int, torch.Tensor] = {}

    def recorder(index: int) -> Callable[[torch.Tensor], None]:
        def record(states: torch.Tensor) -> None:
            store[index] = states

        return record

    with hooks_removed_after([]) as handles:
        for index in sorted(set(wanted)):
            handles.append(register_state_hook(layers, index, recorder(index)))
        yield store


class StateTap:
    """How often each hidden state's hook fired since :meth:`reset`; see :func:`tapping`."""

    def __init__(self, n_states: int, owner: str) -> None:
        self.counts = [0] * n_states
        self.owner = owner

    def reset(self) -> None:
        self.counts = [0] * len(self.counts)

    def check(self) -> None:
        """Raise ``RuntimeError`` unless every hidden state was seen exactly once since ``reset``."""
        bad = {i: c for i, c in enumerate(self.counts) if c != 1}
        if bad:
            n = len(self.counts)
            raise RuntimeError(
                f"the forward hooks on the {n - 1} transformer blocks of {self.owner} fired "
                f"{sum(self.counts)} times in one forward pass, expected n_layers + 1 = {n} (once "
                f"per hidden state); hidden states seen other than once: "
                + ", ".join(f"{i} ({c}x)" for i, c in bad.items())
                + ". This model does not run its blocks once each, in order; use "
                "HFEncoder(..., pool_in_hooks=False) to read output_hidden_states instead"
            )


@contextmanager
def tapping(
    layers: nn.ModuleList,
    wanted: Iterable[int],
    fn: Callable[[int, torch.Tensor], None],
    owner: str = "the model",
) -> Iterator[StateTap]:
    """Call ``fn(index, states)`` on each hidden state in ``wanted`` as the forward pass makes it.

    Hooks go on every hidden state ``0..len(layers)`` (the input of block 0, then the output of
    each block) and count how often they fire; only the ``wanted`` ones call ``fn``, so it can
    reduce a state (pool it) while the next block runs, and no state outlives its block unless
    ``fn`` keeps it. Call ``tap.reset()`` before and ``tap.check()`` after each forward pass.
    Every hook is removed on exit, even on error. Hooks are appended, so states rewritten by
    earlier (e.g. prepended) hooks are the ones seen.
    """
    tap = StateTap(len(layers) + 1, owner)
    wanted = set(wanted)

    def observer(index: int) -> Callable[[torch.Tensor], None]:
        if index in wanted:

            def observe(states: torch.Tensor) -> None:
                tap.counts[index] += 1
                fn(index, states)

        else:

            def observe(states: torch.Tensor) -> None:
                tap.counts[index] += 1

        return observe

    with hooks_removed_after([]) as handles:
        for index in range(len(layers) + 1):
            handles.append(register_state_hook(layers, index, observer(index)))
        yield tap
