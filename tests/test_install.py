"""The installed package is this repository: fastpreact from fastpreact/, fastpreact.kernels from kernels/.

kernels/ sits at the top of the repository and reaches the package only through setup.py's package_dir
mapping; an install that loses the mapping must say so at `import fastpreact`, not later in a kernel call.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import fastpreact
import fastpreact.kernels

REPO = Path(__file__).resolve().parents[1]


def test_installed_package_and_kernels_resolve_to_this_repository():
    assert Path(fastpreact.__file__).resolve().parent == REPO / "fastpreact"
    assert Path(fastpreact.kernels.__file__).resolve().parent == REPO / "kernels"
    from fastpreact.kernels import batch_stats, bn_relu, bn_relu_conv1x1, tuning
    from fastpreact.kernels.bn_relu_conv1x1 import backward, forward
    for mod in (batch_stats, bn_relu, tuning):
        assert Path(mod.__file__).resolve().parent == REPO / "kernels"
    for mod in (bn_relu_conv1x1, forward, backward):  # a sub-package of the kernels
        assert Path(mod.__file__).resolve().parent == REPO / "kernels" / "bn_relu_conv1x1"


def test_import_without_the_kernels_mapping_fails_with_the_fix(tmp_path):
    # The package as a legacy `setup.py develop` install leaves it: fastpreact/ on sys.path, kernels/ not
    # mapped. -S skips site's .pth files (the editable install's finder); site-packages is added by hand
    # so that torch still imports.
    shutil.copytree(REPO / "fastpreact", tmp_path / "fastpreact",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), sysconfig.get_paths()["purelib"]])}
    proc = subprocess.run([sys.executable, "-S", "-c", "import fastpreact"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: fastpreact.kernels is missing from this install"), proc.stderr[-2000:]
    assert "pip install -e ." in last
