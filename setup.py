"""fastpreact: fused Triton kernels and a compact trainer for pre-activation ResNets."""
import sys

import setuptools
from setuptools import find_packages, setup

# An editable install keeps kernels/ as fastpreact.kernels only through PEP 660 (setuptools >= 64),
# whose editable wheel needs bdist_wheel: built into setuptools >= 70.1, from the `wheel` package before.
# pyproject.toml asks for both, but `--no-build-isolation` installs nothing, so say what is missing here
# instead of failing with "invalid command 'bdist_wheel'" or installing without the kernels.
_SETUPTOOLS = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())
if _SETUPTOOLS < (64,):
    sys.exit(f"fastpreact needs setuptools >= 64 to install (found {setuptools.__version__}): "
             "run `pip install -U 'setuptools>=64' wheel`, then the install again")
if _SETUPTOOLS < (70, 1):
    try:
        import wheel  # noqa: F401
    except ImportError:
        sys.exit(f"fastpreact needs the `wheel` package beside setuptools {setuptools.__version__} "
                 "(or setuptools >= 70.1): run `pip install wheel`, then the install again")

setup(
    name="fastpreact",
    version="0.1.0",
    description="Fast training of pre-activation ResNets: fused BN+ReLU+1x1-conv Triton kernels, "
                "DALI loaders and a DDP trainer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ lives at the top of the repository but is installed as fastpreact.kernels: a top-level
    # package named `kernels` would collide with an unrelated PyPI package.
    packages=(find_packages(include=["fastpreact", "fastpreact.*"]) + ["fastpreact.kernels"]
              + [f"fastpreact.kernels.{p}" for p in find_packages("kernels")]),
    package_dir={"fastpreact.kernels": "kernels"},
    # Floors: the oldest versions the code supports (torch.library.custom_op needs torch 2.4).
    install_requires=[
        "torch>=2.4",  # torch.library.custom_op / register_fake / register_autograd: the fused operators
        "torchvision>=0.19",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "timm", "pillow"],
    },
)
