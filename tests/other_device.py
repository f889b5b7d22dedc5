"""A stand-in for a GPU on machines without one: tensors that live on another device.

CI has no GPU, yet the bug a GPU finds first is a tensor made on the CPU inside code that runs on
the GPU (`torch.arange(h)` beside CUDA inputs: "Expected all tensors to be on the same device").
PyTorch's `meta` device raises on the same mix on any machine, but a meta tensor has no values,
so code that looks at values (a boolean mask, `.item()`, NMS, an optimiser step) cannot run on it.

Here a tensor says it is on `OTHER` (the meta device) while it holds real CPU values: `Elsewhere`
is a wrapper subclass whose every operation unwraps, runs on the CPU and wraps the result again,
after checking the device rules a GPU applies:
- an operation on an `OTHER` tensor refuses a CPU tensor among its inputs, except a 0-dim one
  (a CUDA kernel takes a CPU scalar) and the index tensors of indexing;
- factory functions asked for `device=OTHER` (`torch.zeros(..., device=x.device)`) make one;
- `.to(OTHER)` / `.to("cpu")` (and `module.to`) move to and from it, `.item()` reads a value.
So whole forward passes, losses, decoding, training and fine-tuning steps run with their real
numbers, and the first CPU tensor that meets an `OTHER` one raises as on a GPU.

    with other_device():
        head = head.to(OTHER)
        head(features.to(OTHER))   # RuntimeError if the head makes a CPU tensor on the way

The mode covers the thread it is entered in (DataLoader workers then make CPU tensors, as on a
GPU machine; use `num_workers=0` inside it to keep the test in one process).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

OTHER = torch.device("meta")  # has a device guard (autograd needs one) and no kernels of its own

aten = torch.ops.aten
# Operations that take CPU tensors beside device ones on a GPU: copies between devices, and the
# index tensors of indexing (the indexed tensor, and the values put, stay on the device).
COPIES = {aten._to_copy.default, aten.copy_.default}
INDEXING = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}


class Elsewhere(torch.Tensor):
    """A CPU tensor (`elem`) that says it is on OTHER."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> Elsewhere:
        # Never an inference tensor itself (autograd would refuse to make views of it): the
        # stand-in checks devices, not inference mode's rules.
        with torch.inference_mode(False):
            return cls._wrap(elem)

    @classmethod
    def _wrap(cls, elem: torch.Tensor) -> Elsewhere:
        return torch.Tensor._make_wrapper_subclass(
            cls,
            elem.shape,
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            layout=elem.layout,
            device=OTHER,
            requires_grad=elem.requires_grad,
        )

    def __init__(self, elem: torch.Tensor):
        self.elem = elem

    # A traceable wrapper subclass: nn.Module.to swaps parameters for these (swap_tensors)
    def __tensor_flatten__(self):
        return ["elem"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride) -> Elsewhere:
        return Elsewhere(inner["elem"])

    def __repr__(self) -> str:
        return f"Elsewhere({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _on_other(device) -> bool:
    return device is not None and torch.device(device).type == OTHER.type


def _run(func, args, kwargs):
    """One aten operation with OTHER tensors among its inputs (or asked to make one): checked
    like a GPU checks it, run on the CPU values, results wrapped."""
    leaves = tree_leaves((args, kwargs))
    involved = any(isinstance(t, Elsewhere) for t in leaves)
    target = kwargs.get("device")
    if _on_other(target):
        involved, kwargs = True, dict(kwargs, device=torch.device("cpu"))
    if not involved:
        return func(*args, **kwargs)
    for t in leaves:  # a real meta tensor has no values: it must never pass for one of ours
        if isinstance(t, torch.Tensor) and not isinstance(t, Elsewhere) and t.is_meta:
            raise RuntimeError(f"{func}: a meta tensor without values met the stand-in device")
    checked = [] if func in COPIES else leaves
    if func in INDEXING:  # the indices may stay on the CPU
        checked = [args[0], *args[2:3]]
    for t in checked:
        if isinstance(t, torch.Tensor) and not isinstance(t, Elsewhere) and t.dim() > 0:
            raise RuntimeError(
                f"{func}: Expected all tensors to be on the same device, but found at least "
                f"two devices, {OTHER.type} and {t.device}! (a {tuple(t.shape)} tensor)"
            )
    plain_args, plain_kwargs = tree_map(
        lambda t: t.elem if isinstance(t, Elsewhere) else t, (args, kwargs)
    )
    out = func(*plain_args, **plain_kwargs)
    if func is aten._local_scalar_dense.default:  # .item()
        return out
    if func is aten._to_copy.default and target is not None and not _on_other(target):
        return out  # .to("cpu")
    inputs = {id(t.elem): t for t in tree_leaves(args) if isinstance(t, Elsewhere)}

    def wrap(t):
        if not isinstance(t, torch.Tensor):
            return t
        return inputs[id(t)] if id(t) in inputs else Elsewhere(t)  # in place: the input itself

    return tree_map(wrap, out)


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


# torch.tensor and friends copy their data below the dispatcher: caught here, made on the CPU and
# moved to OTHER through the dispatcher.
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.Tensor.new_tensor}


_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}


def _cpu_lists(index):
    """An index with each list of numbers (or bools) turned into a CPU tensor."""
    if isinstance(index, tuple):
        return tuple(_cpu_lists(part) for part in index)
    if isinstance(index, list):
        return torch.tensor(index)
    return index


class _Function(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist and isinstance(args[0], Elsewhere):
            return args[0].elem.tolist()  # a GPU tensor's values come back as Python numbers
        if func in _INDEXING and isinstance(args[0], Elsewhere):
            # A list in an index becomes an index tensor on the indexed tensor's device, made
            # below the dispatcher (a meta tensor here, without values): made on the CPU instead.
            args = (args[0], _cpu_lists(args[1]), *args[2:])
        if func in _FROM_DATA:
            device = kwargs.get("device")
            if device is None and func is torch.Tensor.new_tensor:
                device = args[0].device
            if _on_other(device):
                if func is torch.Tensor.new_tensor:
                    kwargs = {"dtype": args[0].dtype} | kwargs
                    func, args = torch.tensor, args[1:]
                made = func(*args, **(kwargs | {"device": "cpu"}))
                return made.to(OTHER)
        return func(*args, **kwargs)


@contextmanager
def other_device() -> Iterator[torch.device]:
    """Within it, OTHER behaves as a GPU would (see the module's docstring); yields OTHER."""
    with _Function(), _Dispatch():
        yield OTHER


def values(t: torch.Tensor) -> torch.Tensor:
    """The CPU values of an OTHER tensor (a CPU tensor as it is)."""
    return t.elem if isinstance(t, Elsewhere) else t
