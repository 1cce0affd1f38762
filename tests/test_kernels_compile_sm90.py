"""Every Triton kernel compiles for an H100 (sm_90), checked on a machine without a GPU.

The other kernel tests run through TRITON_INTERPRET=1, which accepts code the GPU compiler rejects. Here
tests/_triton_aot.py runs in a subprocess WITHOUT the interpreter: it records every kernel variant the
public entry points launch (GPU tile constants, every autotune config), derives the flags they launch
one way only, and compiles them with
triton.compile(..., target=GPUTarget("cuda", 90, 32)) down to PTX and a cubin (the wheel's ptxas; no
CUDA driver needed). One run (~30-60 s on 2 cores) feeds all the tests below.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("_triton_aot.py")
REPO = SCRIPT.parent.parent


def _variant(e):
    cx = ", ".join(f"{k}={v}" for k, v in e["constexprs"].items())
    return (f"{e['kernel']} [{cx}; num_warps={e['num_warps']} num_stages={e['num_stages']}; "
            f"pointers {sorted({t for t in e['signature'].values() if str(t).startswith('*')})}]")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("aot") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--jobs", "2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "unsupported triton")
    if not out.exists():
        pytest.fail(f"tests/_triton_aot.py crashed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-5000:]}")
    data = json.loads(out.read_text())
    data["log"] = proc.stdout
    return data


def test_checker_rejects_a_kernel_only_the_interpreter_accepts(report):
    # tl.dot on 8x8 tiles runs in the interpreter but not on tensor cores: the check must see that.
    st = report["selftest"]
    assert st["rejects_small_dot"], f"an 8x8 tl.dot compiled for sm_90; the check is blind: {st}"
    assert st["accepts_16x16_dot"], f"a 16x16 tl.dot failed to compile for sm_90: {st['dot_16_error']}"


def test_entry_points_ran(report):
    errors = "\n".join(f"  {e['context']}: {e['error']}" for e in report["entry_point_errors"])
    assert not errors, f"entry points raised while recording kernel launches:\n{errors}"
    assert report["variants_recorded"] > 0 and report["jobs"] > 0


def test_every_kernel_is_exercised(report):
    # A kernel no entry point launches (and no launched kernel calls) would escape the compile check:
    # add the entry point that launches it to GRIDS in tests/_triton_aot.py, or list it with a reason in
    # UNEXERCISED_ALLOWED.
    assert report["discovered"], "no Triton JIT functions found in fastpreact.kernels"
    assert not report["unexercised"], (f"kernels never launched by any entry point (add its "
                                       f"entry point to GRIDS in tests/_triton_aot.py): {report['unexercised']}")


def test_every_kernel_variant_compiles_for_sm90(report):
    failed = [e for e in report["results"] if e["status"] != "compiled"]
    lines = [f"{_variant(e)}\n    first launched by: {e['first_seen']}\n    {e.get('error', '')[:1500]}"
             for e in failed]
    assert not failed, (f"{len(failed)} of {report['jobs']} kernel variants do not compile for sm_90 "
                        f"(triton {report['triton_version']}):\n" + "\n".join(lines))
    for e in report["results"]:
        assert "cubin" in e["stages"] and e["cubin_bytes"] > 0, f"no cubin for {_variant(e)}"
    # Each launched kernel compiled at least once.
    compiled = {e["kernel"] for e in report["results"]}
    assert compiled == set(report["launched"]), sorted(set(report["launched"]) - compiled)


def test_no_kernel_variant_spills_registers(report):
    # Spills go to local memory (off-chip): a tile configuration that spills is a slow one.
    measured = [e for e in report["results"] if e["status"] == "compiled" and "local_bytes" in e]
    assert measured, "cuobjdump reported no resource usage: registers and spills were not checked"
    spilling = [f"{_variant(e)}: {e['local_bytes']} bytes of local memory" for e in measured if e["local_bytes"]]
    assert not spilling, "kernel variants spill registers on sm_90:\n" + "\n".join(spilling)


def test_16_bit_gemm_kernels_use_hopper_wgmma(report):
    # fp16/bf16 tl.dot on sm_90 should compile to wgmma.mma_async, the tensor-core path these kernels'
    # speed depends on.
    gemms = [e for e in report["results"] if e["status"] == "compiled" and e.get("uses_dot")
             and any(t in ("*fp16", "*bf16") for t in e["signature"].values())]
    assert gemms, "no 16-bit tl.dot kernel variant was compiled"
    without = [_variant(e) for e in gemms if not e["wgmma"]]
    assert not without, "16-bit GEMM variants without wgmma on sm_90:\n" + "\n".join(without)


def test_every_autotuned_kernel_has_a_config_that_fits_an_h100(report):
    # Configs over the H100's shared memory are skipped by the autotuner (a warning in the report); a
    # kernel with none left would fail at its first launch.
    assert not report["no_config_fits"], (f"no autotune config fits in 227 KiB of shared memory: "
                                          f"{report['no_config_fits']}")
