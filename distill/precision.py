"""Frozen weights stored in half precision, computed in another dtype, layer by layer.

A frozen UNet or text encoder needs its weights only while one of its layers runs. Stored in
bf16/fp16 they take half the memory of fp32; where the compute dtype is fp32 (no mixed
precision: e.g. a CPU without native bf16, whose bf16 convolutions run ~600x slower than fp32
ones), `store_frozen` makes each layer upcast its own weights on entry and drop the upcast
copy on exit, so a forward holds one layer's fp32 weights at a time (plus what autograd keeps
for backward). The stored tensors themselves are never replaced: a module that shares them
with another (`train/models.py: shared_unet`) keeps sharing them.

diffusers' `enable_layerwise_casting` is not used: it casts by `module.to()`, which replaces the
stored tensors with new ones after every call (sharing breaks, memory doubles), and it leaves
norms uncast. Trainable parameters (`requires_grad`) are never touched: they stay fp32.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

_HANDLES = "_frozen_storage_hooks"
COMPUTE_DTYPE = "_frozen_compute_dtype"


def _frozen_tensors(module: nn.Module, storage: torch.dtype) -> Iterator[tuple[str, bool]]:
    """(name, is_parameter) of the module's own frozen floating tensors in `storage`."""
    for name, p in module.named_parameters(recurse=False):
        if p is not None and p.dtype == storage and not p.requires_grad:
            yield name, True
    for name, b in module.named_buffers(recurse=False):
        if b is not None and b.dtype == storage:
            yield name, False


def store_frozen(model: nn.Module, storage: torch.dtype, compute: torch.dtype) -> nn.Module:
    """Cast `model`'s frozen floating weights to `storage` (in place) and, if `compute` differs,
    make every layer compute in `compute`: its stored weights are upcast on entry and put back
    (the same tensors) on exit, and floating inputs in another dtype are cast to `compute`.
    Idempotent; returns `model`. Trainable parameters are left as they are."""
    remove_frozen_storage(model)
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p is not None and p.is_floating_point() and not p.requires_grad and p.dtype != storage:
                    module._parameters[name] = nn.Parameter(p.data.to(storage), requires_grad=False)
            for name, b in list(module.named_buffers(recurse=False)):
                if b is not None and b.is_floating_point() and b.dtype != storage and name != "position_ids":
                    module._buffers[name] = b.to(storage)
    setattr(model, COMPUTE_DTYPE, compute)
    if storage == compute:
        return model
    for module in model.modules():
        names = list(_frozen_tensors(module, storage))
        if not names:
            continue
        handles = [module.register_forward_pre_hook(_Upcast(names, compute), with_kwargs=True),
                   module.register_forward_hook(_restore, always_call=True)]
        setattr(module, _HANDLES, handles)
    return model


def remove_frozen_storage(model: nn.Module) -> None:
    """Undo `store_frozen`'s hooks (the weights stay in their storage dtype)."""
    for module in model.modules():
        for handle in getattr(module, _HANDLES, ()):
            handle.remove()
        if hasattr(module, _HANDLES):
            delattr(module, _HANDLES)
    if hasattr(model, COMPUTE_DTYPE):
        delattr(model, COMPUTE_DTYPE)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype `model` computes in: `store_frozen`'s compute dtype, else its weights' dtype."""
    found = getattr(model, COMPUTE_DTYPE, None)
    if found is not None:
        return found
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


class _Upcast:
    """Forward pre-hook: swap the module's stored tensors for upcast copies (the originals are
    kept on the module and put back by `_restore`); cast floating inputs to the compute dtype."""

    def __init__(self, names: list[tuple[str, bool]], compute: torch.dtype):
        self.names = names
        self.compute = compute

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        stored = {}
        for name, is_param in self.names:
            table = module._parameters if is_param else module._buffers
            original = table[name]
            if original is None or original.dtype == self.compute:
                continue
            stored[name, is_param] = original
            upcast = original.detach().to(self.compute)
            table[name] = nn.Parameter(upcast, requires_grad=False) if is_param else upcast
        module._frozen_stored = stored
        return tuple(_cast(a, self.compute) for a in args), {k: _cast(v, self.compute) for k, v in kwargs.items()}


def _restore(module: nn.Module, args, output):
    for (name, is_param), original in getattr(module, "_frozen_stored", {}).items():
        (module._parameters if is_param else module._buffers)[name] = original
    module._frozen_stored = {}
    return output


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    return value
