"""Every Triton kernel compiles for every card it is built for (kernels/cards.py CARDS: sm_80 A100, sm_89
L4/L40S/RTX 4090, sm_90 H100/H200, sm_100 B200, sm_120 RTX 5090), checked on a machine without a GPU.

The other kernel tests run through TRITON_INTERPRET=1, which accepts code the GPU compiler rejects and
knows nothing of shared memory, registers or tensor cores. Here tests/kernels/_triton_aot.py runs in
subprocesses WITHOUT the interpreter: it records the kernel launches of the public entry points inside
kernels.cards.pretend(card) (that card's fixed tiles, and every config of its tuned kernels), and
compiles them with triton.compile(..., target=GPUTarget("cuda", arch, 32)) down to PTX and a cubin (the
wheel's ptxas; no CUDA driver needed).

  sm_90  the default plan: every argument type and every value of every code constexpr of every kernel
         (flags launched one way only flipped), and every config of each kernel's richest variant, in
         fp32, fp16 and bf16.
  sm_80, sm_89, sm_100, sm_120  the runtime plan: the entry points run under bf16 autocast (and in fp32
         on sm_80 and sm_89), and per kernel the richest variant (the most optional code: dual outputs,
         epilogue statistics, stride 2, ...) compiles with every config that configs.candidates() offers
         on that card, i.e. everything its tuner may launch there. It checks what depends on the card
         (shared memory against its limit, registers and spills, the tensor-core instruction, the
         runtime's shared-memory estimate). Left to sm_90's default plan: the code paths (they compile the
         same way for every card), fp16 (compiled sizes and instruction family as bf16's), fp32 on
         sm_100 (the Hopper configs, compiled sizes within 16 bytes of sm_90's) and on sm_120 (the
         configs and shared memory of sm_89, identical compiled sizes). `python tests/kernels/_triton_aot.py
         --arch N` runs the default plan for any card.
The five run concurrently (~3 minutes of two cores' time when nothing else runs; ~5 under load); one
fixture feeds every test below, per card.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("_triton_aot.py")
REPO = SCRIPT.parent.parent
DEFAULT_ARCH = 90
RUNTIME = ["--plan", "runtime", "--dtypes"]
PLANS = {90: [], 80: RUNTIME + ["bf16,fp32"], 89: RUNTIME + ["bf16,fp32"], 100: RUNTIME + ["bf16"],
         120: RUNTIME + ["bf16"]}
# The tensor-core instruction a 16-bit tl.dot must reach on each card: Hopper's warpgroup MMA, datacenter
# Blackwell's tcgen05 (tensor memory) MMA, and the warp-level mma.sync of Ampere, Ada and sm_120.
TENSOR_CORE = {80: "mma.sync", 89: "mma.sync", 90: "wgmma.mma_async", 100: "tcgen05.mma", 120: "mma.sync"}


def _variant(e):
    cx = ", ".join(f"{k}={v}" for k, v in e["constexprs"].items())
    return (f"{e['kernel']} [{cx}; num_warps={e['num_warps']} num_stages={e['num_stages']}; "
            f"pointers {sorted({t for t in e['signature'].values() if str(t).startswith('*')})}]")


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """{arch: report dict (with "returncode", "log", "wall_s"), or {"skip": why} / {"crash": text}}."""
    pytest.importorskip("triton")
    out_dir = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    procs, start = {}, time.time()
    # All at once: the default plan with two compile processes, the others with one each, so that the
    # cards' start-up and recording overlap the others' compiles and both cores stay busy to the end.
    for arch, extra in PLANS.items():
        out = out_dir / f"sm_{arch}.json"
        jobs = "2" if arch == DEFAULT_ARCH else "1"
        procs[arch] = (out, subprocess.Popen(
            [sys.executable, str(SCRIPT), "--arch", str(arch), "--out", str(out), "--jobs", jobs, "--quiet", *extra],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    found = {}
    for arch, (out, proc) in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=max(60, 900 - (time.time() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            found[arch] = {"crash": f"sm_{arch}: timed out after {time.time() - start:.0f} s\n{stdout[-3000:]}"}
            continue
        if proc.returncode == 3:
            found[arch] = {"skip": stdout.strip().splitlines()[-1] if stdout.strip() else "unsupported triton"}
        elif not out.exists():
            found[arch] = {"crash": f"tests/kernels/_triton_aot.py --arch {arch} crashed (exit {proc.returncode}):\n"
                                    f"{stdout[-3000:]}\n{stderr[-5000:]}"}
        else:
            found[arch] = dict(json.loads(out.read_text()), returncode=proc.returncode, log=stdout,
                               wall_s=round(time.time() - start, 1))
    return found


@pytest.fixture(params=sorted(PLANS), ids=lambda arch: f"sm_{arch}")
def report(request, reports):
    data = reports[request.param]
    if "skip" in data:
        pytest.skip(data["skip"])
    if "crash" in data:
        pytest.fail(data["crash"])
    assert data["arch"] == request.param and data["target"]["arch"] == request.param
    return data


def test_checker_rejects_a_kernel_only_the_interpreter_accepts(report):
    # tl.dot on 8x8 tiles runs in the interpreter but not on tensor cores: the check must see that.
    st, card = report["selftest"], report["card"]["name"]
    assert st["rejects_small_dot"], f"an 8x8 tl.dot compiled for {card}; the check is blind: {st}"
    assert st["accepts_16x16_dot"], f"a 16x16 tl.dot failed to compile for {card}: {st['dot_16_error']}"


def test_entry_points_ran(report):
    errors = "\n".join(f"  {e['context']}: {e['error']}" for e in report["entry_point_errors"])
    assert not errors, f"entry points raised while recording kernel launches:\n{errors}"
    assert report["variants_recorded"] > 0 and report["jobs"] > 0


def test_every_kernel_is_exercised(report):
    # A kernel no entry point launches (and no launched kernel calls) would escape the compile check:
    # add the entry point that launches it to GRIDS in tests/kernels/_triton_aot.py, or list it with a reason in
    # UNEXERCISED_ALLOWED.
    assert report["discovered"], "no Triton JIT functions found in fastpreact.kernels"
    assert not report["unexercised"], (f"kernels never launched by any entry point (add its "
                                       f"entry point to GRIDS in tests/kernels/_triton_aot.py): {report['unexercised']}")


def test_every_kernel_variant_compiles(report):
    # Includes the fixed-tile kernels' shared memory: one over the card's limit is a failed variant.
    failed = [e for e in report["results"] if e["status"] != "compiled"]
    lines = [f"{_variant(e)}\n    first launched by: {e['first_seen']}\n    {e.get('error', '')[:1500]}"
             for e in failed]
    assert not failed, (f"{len(failed)} of {report['jobs']} kernel variants do not compile for "
                        f"{report['card']['name']} (triton {report['triton_version']}):\n" + "\n".join(lines))
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
    assert not spilling, f"kernel variants spill registers on {report['card']['name']}:\n" + "\n".join(spilling)
    assert report["spilling"] == [] and 0 < report["max_registers"] <= 255


def test_16_bit_gemms_use_the_cards_tensor_cores(report):
    # fp16/bf16 tl.dot should compile to the card's tensor-core instruction (wgmma.mma_async on sm_90,
    # tcgen05.mma on sm_100, mma.sync on sm_80/89/120), the path these kernels' speed depends on.
    want = TENSOR_CORE[report["arch"]]
    assert report["tensor_core_instruction"] == want
    gemms = [e for e in report["results"] if e["status"] == "compiled" and e.get("ir_dots")
             and e["dtype"] in ("fp16", "bf16")]
    assert gemms, "no 16-bit tl.dot kernel variant was compiled"
    without = [_variant(e) for e in gemms if not e["tensor_core"][want]]
    assert not without, f"16-bit GEMM variants without {want} on {report['card']['name']}:\n" + "\n".join(without)
    assert not report["no_tensor_core"]


def test_every_tuned_kernel_has_a_config_that_fits_the_card(report):
    # Configs over the card's shared memory are skipped at run time (a warning in the report); a kernel
    # variant with none left could not launch at all.
    limit = report["shared_limit_bytes"]
    assert not report["no_config_fits"], (f"no config fits in {limit} bytes of shared memory on "
                                          f"{report['card']['name']}: {report['no_config_fits']}")
    assert report["shared_memory"], "no tuned kernel was compiled"
    assert all(row["some_config_fits"] for row in report["shared_memory"].values())


def test_runtime_offers_only_configs_that_fit(report):
    # configs.candidates() filters the configs by an estimate (configs.shared_bytes); a config it keeps
    # whose compiled shared memory does not fit would fail at launch (when it is the only candidate) or
    # waste tuning time: the estimate must not be below what the compiler allocates.
    assert not report["runtime_offers_unfit"], (
        f"configs.candidates() offers configs that do not fit {report['card']['name']}'s "
        f"{report['shared_limit_bytes']} bytes:\n" + "\n".join(report["runtime_offers_unfit"]))


def test_the_check_passes(report):
    # Whatever the tests above do not single out (the script's own verdict), with its summary.
    assert report["ok"] and report["returncode"] == 0, report["log"][-6000:]
