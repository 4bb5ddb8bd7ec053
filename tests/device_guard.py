"""A test double for a second device: tensors on the model's device and host tensors are told apart on a CPU, and
an op that mixes them fails as it would on a GPU.

There is no GPU here, so every tensor is on the CPU and a device mix-up (a host tensor in an op with the model's
activations) passes unnoticed. :class:`VirtualAccelerator` is a ``TorchFunctionMode`` that tags every tensor as
``model`` (on the model's device) or ``host`` and follows the tags through every torch call:

- the model's parameters and buffers are ``model``;
- a ``model`` tensor reports its device as ``cpu:0``, a host tensor as ``cpu`` (``Tensor.device`` is patched inside
  the block), so code that follows a tensor's device (``device=logits.device``,
  ``next(model.parameters()).device``, ``.to(h.device)``) lands on that tensor's side: a factory or ``.to`` given a
  device with an index makes a ``model`` tensor, given ``"cpu"`` or no device a ``host`` one; ``.to(t)`` follows
  ``t``; ``.cpu()`` / ``.numpy()`` / ``.tolist()`` / ``.item()`` leave for the host;
- any other op's outputs are ``model`` when an input is, else ``host``;
- an op whose tensor inputs of one or more dimensions are on both sides raises :class:`DeviceMixError`, as CUDA
  does. Allowed as on CUDA: 0-dim host tensors (scalars), host index tensors in indexing, copies across devices
  (``copy_``, item assignment, ``deepcopy``).

It models the common rule, not every CUDA kernel (a device index given by hand, ``cpu:0``, is read as the model's
device).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

MODEL, HOST = "model", "host"

_LEAVE_FOR_HOST = {torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist, torch.Tensor.item}
_CROSS_DEVICE = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.copy_, torch.Tensor.index_put_,
                 torch.Tensor.index_put, torch.Tensor.__deepcopy__}
_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
              torch.randn, torch.rand, torch.randint, torch.eye, torch.linspace}


class DeviceMixError(RuntimeError):
    """An op received tensors on the model's device and on the host."""


MODEL_DEVICE = torch.device("cpu", 0)
"""What a ``model`` tensor reports as its device inside the block (a real CPU device: factories accept it)."""
_REAL_DEVICE = torch._C.TensorBase.device


def _device_side(device) -> str | None:
    if device is None:
        return None
    device = torch.device(device) if isinstance(device, (str, int)) else device
    return HOST if device.type == "cpu" and device.index is None else MODEL


class VirtualAccelerator(TorchFunctionMode):
    """``with VirtualAccelerator(model):`` every op that mixes the model's device and the host raises
    :class:`DeviceMixError` (see the module docstring). ``ops`` counts the calls it checked."""

    def __init__(self, *models: torch.nn.Module):
        super().__init__()
        self.side = WeakTensorKeyDictionary()
        for model in models:
            for t in (*model.parameters(), *model.buffers()):
                self.side[t] = MODEL
        self.ops = 0

    def __enter__(self):
        side = self.side

        def device(t):
            return MODEL_DEVICE if side.get(t, HOST) == MODEL else _REAL_DEVICE.__get__(t)

        torch.Tensor.device = property(device)
        try:
            return super().__enter__()
        except BaseException:
            del torch.Tensor.device
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            del torch.Tensor.device  # back to TensorBase's

    def _side(self, t: torch.Tensor) -> str:
        return self.side.get(t, HOST)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func in _LEAVE_FOR_HOST:
            side = HOST
        elif func is torch.Tensor.to:
            side = self._to_side(args, kwargs)
        elif func in _FACTORIES or getattr(func, "__name__", "").endswith("_like") or \
                getattr(func, "__name__", "").startswith("new_"):
            side = _device_side(kwargs.get("device"))
            if side is None:
                side = self._side(args[0]) if tensors and func not in _FACTORIES else HOST
        elif func in _CROSS_DEVICE:
            side = self._side(args[0]) if tensors else HOST
        else:
            sides = {self._side(t) for t in tensors if t.dim() > 0}
            if len(sides) > 1:
                shapes = ", ".join(f"{tuple(t.shape)} on {self._side(t)}" for t in tensors)
                raise DeviceMixError(f"{getattr(func, '__qualname__', func)} mixes the model's device and the host: "
                                     f"{shapes}")
            side = MODEL if MODEL in {self._side(t) for t in tensors} else HOST

        def tag(x):
            if isinstance(x, torch.Tensor):
                self.side[x] = side
            return x

        if func in _LEAVE_FOR_HOST or func is torch.Tensor.to:
            if out is args[0] and side != self._side(args[0]):
                out = out.view_as(out)  # on a GPU this is a new tensor on the other side: the input keeps its own
        tree_map(tag, out)
        return out

    def _to_side(self, args, kwargs) -> str:
        target = kwargs.get("device")
        for a in args[1:]:
            if isinstance(a, torch.Tensor):
                return self._side(a)
            if isinstance(a, (torch.device, str)):
                target = a
        side = _device_side(target)
        return side if side is not None else self._side(args[0])
