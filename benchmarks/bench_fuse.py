"""fuse suite: training steps of third-party ResNets, unfused vs fastpreact.fuse(model).

GPU: torchvision resnet50 (post-activation: conv2 -> bn2 -> relu -> conv3 found by tracing) and timm
resnetv2_50 / resnetv2_101 (pre-activation, BatchNormAct2d), batch 64, 224 px, bf16 autocast,
channels-last, SGD with momentum. CPU: the same constructors with one unit per stage and narrow widths
(torchvision's Bottleneck with expansion 1 and width_per_group 16; timm's channels 32..256), batch 2 at 16 px, fp32, the fused op through the interpreter. Random initialisation (offline).
Rows: name "fuse", model, kernels "stock" (unfused) or "fused", img/s, peak memory, and the count of
chains fuse() rewrote per pattern.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import _bench as B

BATCH, IMAGE, NUM_CLASSES = (64, 224, 1000) if B.FULL else (2, 16, 10)
MODELS = ("torchvision/resnet50", "timm/resnetv2_50", "timm/resnetv2_101")


def make_model(name):
    torch.manual_seed(0)
    lib, arch = name.split("/")
    if lib == "torchvision":
        import torchvision
        from torchvision.models.resnet import Bottleneck, ResNet
        if B.FULL:
            return getattr(torchvision.models, arch)(weights=None, num_classes=NUM_CLASSES)
        class NarrowBottleneck(Bottleneck):  # torchvision's own unit and forward, outputs 64..512 wide
            expansion = 1
        return ResNet(NarrowBottleneck, [1, 1, 1, 1], num_classes=NUM_CLASSES, width_per_group=16)
    import timm
    if B.FULL:
        return timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES)
    return timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES, layers=[1, 1, 1, 1],
                             channels=(32, 64, 128, 256), stem_chs=16)


@pytest.mark.parametrize("kernels", ["stock", "fused"])
@pytest.mark.parametrize("model_name", MODELS)
def test_fuse(benchmark, results, model_name, kernels):
    row = dict(name="fuse", model=model_name, kernels=kernels, batch=BATCH, image_size=IMAGE, dtype=B.DTYPE_NAME,
               stands_for=None if B.FULL else f"{model_name} with one unit per stage, narrow (CPU)")
    if not B.FULL and model_name == "timm/resnetv2_101":
        B.unavailable(results, row, "CPU run: resnetv2_101 differs from resnetv2_50 only in depth; "
                                    "measured on a GPU")
    B.free_memory()
    try:
        model = make_model(model_name)
    except Exception as exc:
        B.unavailable(results, row, f"cannot build {model_name}: {B.first_line(exc)}")
    counts = None
    if kernels == "fused":
        try:
            from fastpreact import fuse, fused_chains
            model = fuse(model)
            counts = dict(fused_chains(model))
        except Exception as exc:
            B.unavailable(results, row, f"fastpreact.fuse failed: {B.first_line(exc)}")
    model = model.to(B.DEVICE, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g).to(B.DEVICE, B.AMP_DTYPE or torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g).to(B.DEVICE)

    step = B.eager_step(model, opt, x, y)

    def target():
        step()
        B.sync()

    try:
        for _ in range(B.warmup_steps(kernels)):
            step()
        B.reset_peak()
        seconds = B.time_call(benchmark, target, warmup=0, rounds_=B.rounds(8, 1))
    except Exception as exc:
        if kernels == "stock":
            raise
        B.unavailable(results, row, f"fused training step failed: {B.first_line(exc)}")
    peak = B.peak_gb()
    row.update(ms=B.sig(seconds * 1e3), img_per_s=B.sig(BATCH / seconds),
               peak_mem_gb=None if peak is None else B.sig(peak), fused_counts=counts)
    B.record(results, benchmark, row)
