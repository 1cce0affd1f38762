"""Activation memory: the bytes autograd saves for backward in one training forward, fused against stock.

saved_bytes(model, x) counts the distinct storages that autograd's saved-tensor hooks see, parameters
and buffers excluded. saved_bytes_of(arch, kernels, image) runs it on fake tensors (shapes only, so a
ResNet-200 at 224 px takes seconds on a CPU): what is saved depends on the shapes, never on the values or
the device. The fused path is counted on the PyTorch math of its ops, whose autograd Functions save
exactly what the kernels' do (x, the weight, the BatchNorm vectors; never the BN or ReLU output).
"""
from __future__ import annotations

import torch

__all__ = ["saved_bytes", "saved_bytes_of"]


def _storage_key(t):
    storage = t.untyped_storage()
    return storage._cdata  # the same for every view of one storage, fake tensors included


def saved_bytes(model, x) -> int:
    """Bytes of the distinct storages autograd saves for backward during one training forward of model on
    x, parameters and buffers excluded (torch.autograd.graph.saved_tensors_hooks)."""
    state = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
    seen = {}

    def pack(t):
        key = _storage_key(t)
        if key not in state:
            seen[key] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(seen.values())


def saved_bytes_of(arch: str, kernels: str, image: int, batch: int = 1, num_classes: int = 10) -> int:
    """saved_bytes of create_model(arch, kernels=kernels) in training, channels-last, on a fake
    [batch, 3, image, image] input."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..functional import backends
    from ..models import create_model
    previous = backends.interpret(False)  # the ops' PyTorch math: the same saved tensors, no kernels
    try:
        with FakeTensorMode():
            model = create_model(arch, num_classes, kernels=kernels)
            with torch.no_grad():
                for t in list(model.parameters()) + list(model.buffers()):
                    if t.dim() == 4:
                        t.data = t.data.contiguous(memory_format=torch.channels_last)
            x = torch.randn(batch, 3, image, image).contiguous(memory_format=torch.channels_last)
            return saved_bytes(model.train(), x)
    finally:
        backends.interpret(previous)
