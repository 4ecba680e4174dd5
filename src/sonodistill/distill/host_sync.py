"""Counting the points where the host waits for the device (host syncs), on a GPU or a CPU.

On CUDA, torch's own sync debug mode (`torch.cuda.set_sync_debug_mode("warn")`) warns at every
synchronising call. A CPU has no such thing, since nothing is asynchronous there, so
`HostReads` counts the calls that would synchronise if the tensor were on a GPU: reading values
(`item`, `tolist`, `numpy`, `cpu`, `bool`/`int`/`float` of a tensor, formatting) and the ops
whose output size depends on the values (`nonzero`, `masked_select`, `unique`, boolean
indexing). It is stricter than the GPU count (a CPU tensor that would stay on the host on a GPU
counts too), except for what stays on the host on a GPU as well and is left out: the
optimiser's step counters (non-fused AdamW; fused AdamW keeps them on the device) and the data
pipeline (`torch.utils.data` and `sonodistill.data`: the sampler's order, the loader's seeds),
whose batch reaches the device after it.

Our own: torch offers the sync debug mode on CUDA only; a `TorchFunctionMode` sees every call.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable

import torch
from torch.overrides import TorchFunctionMode

READS = frozenset(
    {
        "item",
        "tolist",
        "numpy",
        "cpu",
        "__bool__",
        "__int__",
        "__float__",
        "__index__",
        "__format__",
        "nonzero",
        "argwhere",
        "masked_select",
        "unique",
        "unique_consecutive",
    }
)
_INDEXING = frozenset({"__getitem__", "__setitem__", "index_put_", "index_put"})
HOST_MODULES = ("torch.utils.data", "sonodistill.data")
"""Code that runs on the host on a GPU too (module doc)."""


class HostReads(TorchFunctionMode):
    """Within the block, `count` is the number of calls that read a tensor's values on the host
    (module doc), and `where` names each: "tolist in sonodistill.distill.recipe.read_back".
    `optimizers`: their step counters are not counted."""

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        super().__init__()
        self.optimizers = list(optimizers)
        self.where: list[str] = []

    @property
    def count(self) -> int:
        return len(self.where)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if (name in READS or (name in _INDEXING and _bool_index(args))) and not self._host(args):
            caller = _caller()
            if not caller.startswith(HOST_MODULES):
                self.where.append(f"{name} in {caller}")
        return func(*args, **(kwargs or {}))

    def _host(self, args) -> bool:
        first = args[0] if args else None
        return any(
            first is state.get("step")
            for optimizer in self.optimizers
            for state in optimizer.state.values()
        )


def _caller() -> str:
    """module.function of the first frame outside torch's dispatch and this module."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module not in (__name__, "torch.overrides", "torch._tensor"):
            return f"{module}.{frame.f_code.co_name}"
        frame = frame.f_back
    return ""


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def count_host_syncs(
    fn: Callable[[], object], device: torch.device, optimizers: Iterable = ()
) -> int:
    """Host syncs in one call of `fn`: torch's sync debug mode on CUDA, `HostReads` elsewhere."""
    if device.type != "cuda":
        with HostReads(optimizers) as reads:
            fn()
        return reads.count
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)
