"""fastpreact: fused Triton kernels and a compact trainer for pre-activation ResNets."""
from setuptools import find_packages, setup

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
    packages=find_packages(include=["fastpreact", "fastpreact.*"]) + ["fastpreact.kernels"],
    package_dir={"fastpreact.kernels": "kernels"},
    # Floors admit the GPU machine's offline software (torch 2.11, triton 3.6, torchvision 0.26).
    install_requires=[
        "torch>=2.4",
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
