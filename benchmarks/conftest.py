"""Benchmark configuration: `pytest benchmarks --benchmark` runs the suites; without the flag they skip.

- The suites live in bench_*.py files (collected here, so the root pytest.ini needs no change) and
  time with pytest-benchmark's pedantic mode, synchronising the device inside the timed function.
- Without CUDA, TRITON_INTERPRET=1 is set before triton is imported (as in tests/conftest.py), so the
  fused path runs through the Triton interpreter at tiny sizes; the numbers are labelled CPU.
- Every benchmark writes its rows into benchmarks/results/<date>-<slug>.json and .md as it ends
  (FASTPREACT_RESULTS_DIR overrides the directory); see _bench.py.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # One intra-op thread: at the tiny CPU sizes, OpenMP threads on a loaded machine spin against
    # each other (a 2x8x7x7 conv step took 300 ms with 2 threads and 0.2 ms with one).
    torch.set_num_threads(int(os.environ.get("FASTPREACT_BENCH_CPU_THREADS", "1")))

import pytest  # noqa: E402

from benchmarks import _bench  # noqa: E402

try:
    import pytest_benchmark  # noqa: F401
    HAVE_PYTEST_BENCHMARK = True
except ImportError:
    HAVE_PYTEST_BENCHMARK = False


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the fastpreact benchmark suites in benchmarks/ (skipped without it)")


def pytest_collect_file(file_path, parent):
    # bench_*.py are not test_*.py: collect them as test modules here (a file named on the command line
    # is already collected by pytest's python plugin).
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped, with the reason, where CUDA is absent)")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    mine = [it for it in items if str(it.path).startswith(here + os.sep)]
    if not config.getoption("--benchmark"):
        skip = pytest.mark.skip(reason="benchmarks run only with --benchmark (pytest benchmarks --benchmark)")
        for item in mine:
            item.add_marker(skip)
        return
    if not HAVE_PYTEST_BENCHMARK:
        skip = pytest.mark.skip(reason="pytest-benchmark is not installed: pip install pytest-benchmark")
        for item in mine:
            if "benchmark" in getattr(item, "fixturenames", ()):
                item.add_marker(skip)
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
        for item in mine:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def results():
    """The session's results file (rows merge with earlier runs of the same day on the same device)."""
    return _bench.ResultsLog()


@pytest.fixture(scope="session")
def device():
    return _bench.DEVICE


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not config.getoption("--benchmark", default=False):
        return
    directory = os.environ.get("FASTPREACT_RESULTS_DIR") or os.path.join(_bench.HERE, "results")
    note = "" if _bench.ON_GPU else "  [CPU at tiny sizes: shows the suites run, never quote as performance]"
    terminalreporter.write_line(f"fastpreact results: {directory}/<date>-{_bench.device_slug()}.json and .md{note}")
