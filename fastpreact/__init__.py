"""fastpreact: the fastest way to train pre-activation ResNets in PyTorch.

Public interface (see DESIGN.md): fastpreact.models.create_model, fastpreact.BNReLUConv1x1,
fastpreact.functional.bn_relu_conv1x1, fastpreact.fuse, and `python -m fastpreact.train`.
"""
__version__ = "0.1.0"

from . import functional, reference  # noqa: F401
from .modules import BNReLUConv1x1, BNReLUConv1x1Dual  # noqa: F401


def __getattr__(name):
    # fuse and models import lazily so `import fastpreact` stays light (no torchvision/fx at import).
    if name in ("fuse", "models"):
        # fastpreact.fuse is the module fastpreact/fuse.py, which is itself callable: fastpreact.fuse(model).
        import importlib
        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'fastpreact' has no attribute {name!r}")
