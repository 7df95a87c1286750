"""What a piece of code asks of the device: the aten ops it dispatches, and which of them stop the host.

On a GPU the host queues kernels ahead of the device; an op whose result the host must read (a
tensor's value as a Python number, a data-dependent shape, a copy of Python data to the device)
waits for everything queued before it, and the device idles while the host prepares what comes
next. :class:`OpLog` records every op dispatched inside it, on any device, so that such ops can be
found (and counted) on a CPU.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops whose result the host reads (a value or an output shape), or that copy host data to the device
HOST_SYNC_OPS = frozenset(
    {
        "aten.nonzero",
        "aten.argwhere",
        "aten._local_scalar_dense",
        "aten.is_nonzero",
        "aten.equal",
        "aten.masked_select",
        "aten.unique",
        "aten._unique",
        "aten._unique2",
        "aten.unique_consecutive",
        "aten.unique_dim",
        "aten.lift_fresh",
        "aten.repeat_interleave",
        "aten.bincount",
    }
)
# indexing with a boolean mask needs the mask's nonzero count for its shape
MASK_INDEX_OPS = frozenset({"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"})


def _is_mask_index(name: str, args: tuple) -> bool:
    if name not in MASK_INDEX_OPS or len(args) < 2:
        return False
    indices = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


class OpLog(TorchDispatchMode):
    """``with OpLog() as log: ...`` -> ``log.ops`` (op name -> count), ``log.total``, ``log.syncs``
    (the host-synchronising ops, name -> count). Names are overload packets, e.g. ``aten.mul``. A
    ``repeat_interleave`` given its ``output_size`` does not synchronise but is counted all the same."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if name in HOST_SYNC_OPS or _is_mask_index(name, args):
            self.syncs[name] += 1
        if name == "aten._to_copy" and kwargs and kwargs.get("device") is not None and args:
            source, target = args[0].device, torch.device(kwargs["device"])
            # a transfer between host and device waits, but a non_blocking one from the host's pinned
            # memory (on a machine without a GPU, pinning is taken for granted for other targets)
            queued = kwargs.get("non_blocking") and source.type == "cpu" and (target.type != "cuda" or args[0].is_pinned())
            if source.type != target.type and not queued:
                self.syncs[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())
