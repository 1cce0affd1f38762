"""fastpreact: the fastest way to train pre-activation ResNets in PyTorch.

Public interface: fastpreact.models.create_model, fastpreact.BNReLUConv1x1,
fastpreact.functional.bn_relu_conv1x1, fastpreact.fuse (and fused_chains), `python -m fastpreact.train`
and `python -m fastpreact.check`.

  kernels/     Triton kernels (fastpreact.kernels), their tiles per card and the tuner
  functional/  the fused ops (autograd Functions and torch.library operators) and the PyTorch fallback
  nn/          drop-in modules on the fused ops
  models/      the paper's ResNets, stock and fused units
  data/        CIFAR, ImageNet (DALI, torchvision), synthetic, the embedded shapes10
  train/       python -m fastpreact.train
  fusion/      fastpreact.fuse(model)
  cost/        the step cost model (launches, bytes, FLOPs, roofline)
  reference.py the PyTorch oracle; check.py python -m fastpreact.check
"""
import importlib.util as _importlib_util

__version__ = "0.1.0"

# kernels/ sits at the top of the repository and is installed as fastpreact.kernels (setup.py's
# package_dir). A legacy `setup.py develop` install (old setuptools, no PEP 660) drops that mapping;
# without this check every fused path would then fail far from the cause.
if _importlib_util.find_spec(__name__ + ".kernels") is None:
    raise ImportError(
        "fastpreact.kernels is missing from this install (kernels/ was not mapped to fastpreact.kernels, "
        "as a legacy `setup.py develop` install does): reinstall with `pip install -U pip 'setuptools>=64'` "
        "and then `pip install -e .` from the repository")

from . import functional, reference  # noqa: F401
from .nn import BNReLUConv1x1, BNReLUConv1x1Dual  # noqa: F401
from .fusion import fuse, fused_chains  # noqa: F401,E402  (light: the machinery loads on first call)


def __getattr__(name):
    # models imports lazily so `import fastpreact` stays light.
    if name == "models":
        import importlib
        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'fastpreact' has no attribute {name!r}")
