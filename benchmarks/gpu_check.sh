#!/usr/bin/env bash
# One-shot GPU check: install, GPU tests, then the benchmarks in order of importance, in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]        (default OUTDIR: benchmarks/results/)
#
# Stages, in order, each under its own `timeout` and cut to the time left of the whole budget
# (GPU_CHECK_BUDGET_S, default 450 s = 7.5 min), each writing into OUTDIR as soon as it runs:
#   0. python -m fastpreact.check        kernels vs stock in fp32/fp16/bf16 (real tuner), then speed
#   1. pytest -m gpu tests                every kernel compiled and checked on the GPU, bf16 included
#   2. op suite, ResNet-200 shapes        fused vs stock, forward / backward / both
#   3. train_step resnet200               stock, fused, torch.compile
#   4. train_step resnet1001              stock eager vs fused with a CUDA-graph step
#   5. the rest while time remains        ResNet-1001 op shapes, the other train_step rows, the op
#                                         compile rows, units, fuse(), max_batch, loaders
# Files in OUTDIR (at most 8, names of letters, digits, '.', '_' and '-'), STEM = <date>-<gpu slug>:
#   STEM.json, STEM.md     results, rewritten after every benchmark (pytest benchmarks --benchmark)
#   STEM-env.log           install, nvidia-smi, versions, the stage summary, the check's table
#   STEM-check.json        the check's rows and verdict
#   STEM-gpu-tests.log     stage 1;   STEM-bench.log: stages 2-5, appended as they run
#   STEM-readme.md, STEM.png   README table and chart rendered from STEM.json at the end
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S, GPU_CHECK_<STAGE>_S for the stage caps,
# GPU_CHECK_SKIP_INSTALL=1 to use the project as already installed.
set -u -o pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-450}
PY=${PYTHON:-python3}
OUTDIR=${1:-benchmarks/results}
mkdir -p "$OUTDIR" || { echo "gpu_check: cannot create $OUTDIR; pass a writable directory"; exit 2; }
OUTDIR=$(cd "$OUTDIR" && pwd)
DATE=$(date -u +%Y-%m-%d)
SLUG=$("$PY" -c "from benchmarks import _bench; print(_bench.device_slug())" 2>/dev/null)
if [ -z "$SLUG" ]; then echo "gpu_check: '$PY' cannot import torch; set PYTHON to the interpreter that has it"; exit 2; fi
STEM="$DATE-$SLUG"
ENVLOG="$OUTDIR/$STEM-env.log"
BENCHLOG="$OUTDIR/$STEM-bench.log"
export FASTPREACT_RESULTS_DIR="$OUTDIR" FASTPREACT_RESULTS_DATE="$DATE" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export FASTPREACT_RESULTS_RUN="gpu_check-$(date -u +%Y-%m-%dT%H:%M:%SZ)"  # the stages write one results file
# Autotuning results go to Triton's on-disk cache, so a shape tuned by the GPU tests or an earlier stage is
# not tuned again by the next process (a no-op where a Triton version lacks the knob).
export TRITON_CACHE_AUTOTUNING=1
: > "$BENCHLOG"

log() { echo "$*" | tee -a "$ENVLOG"; }
left() { echo $(( START + BUDGET - $(date +%s) )); }

# stage NAME CAP_SECONDS LOGFILE COMMAND...: run under timeout(min(cap, time left - 15 s)), append to LOGFILE.
stage() {
  local name=$1 cap=$2 logfile=$3; shift 3
  local remain t s0 rc
  remain=$(left)
  t=$(( cap < remain - 15 ? cap : remain - 15 ))
  if [ "$t" -lt 15 ]; then log "[$name] skipped: $remain s left of the ${BUDGET} s budget"; return 0; fi
  log "[$name] start (limit ${t} s): $*"
  echo "===== [$name] $(date -u +%H:%M:%S) limit ${t} s: $*" >> "$logfile"
  s0=$(date +%s)
  timeout -k 5 "$t" "$@" >> "$logfile" 2>&1
  rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    log "[$name] CUT at ${t} s (rows measured so far are in $STEM.json)"
  else
    log "[$name] rc=$rc in $(( $(date +%s) - s0 )) s"
  fi
  tail -n 2 "$logfile" | sed "s/^/[$name]   /"
}

: > "$ENVLOG"
log "gpu_check $(date -u +%FT%TZ), budget ${BUDGET} s, results in $OUTDIR ($STEM.*)"
if [ -z "${GPU_CHECK_SKIP_INSTALL:-}" ]; then
  "$PY" -m pip install -e . --no-deps --no-build-isolation -q >> "$ENVLOG" 2>&1 \
    || log "pip install -e . failed (see above); the checks run from the source tree"
fi
# The fused paths need fastpreact.kernels; an install that lost the kernels/ mapping stops here, not mid-run.
if ! KERNELS=$(cd /tmp && "$PY" -c "import fastpreact.kernels as k; print(k.__path__[0])" 2>&1 | tail -n 1); then
  log "gpu_check: fastpreact.kernels does not import: $KERNELS"; exit 2
fi
log "fastpreact.kernels from $KERNELS"
if command -v nvidia-smi > /dev/null; then
  log "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)"
  nvidia-smi >> "$ENVLOG" 2>&1
else
  log "nvidia-smi not found"
fi
"$PY" - >> "$ENVLOG" 2>&1 <<'EOF'
import platform, torch
import importlib
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
for m in ("triton", "torchvision", "timm", "pytest", "pytest_benchmark", "fastpreact"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as exc:
        print(m, "MISSING", type(exc).__name__, exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs")
else:
    print("device: NO CUDA DEVICE (the benchmarks will run at CPU sizes)")
EOF
grep -E "^(python|device|triton|torchvision|timm|pytest|fastpreact)" "$ENVLOG"

BENCH=("$PY" -m pytest --benchmark -q -rs -p no:cacheprovider)
OP=benchmarks/bench_bn_relu_conv1x1.py
TRAIN=benchmarks/bench_train_step.py

stage check "${GPU_CHECK_CHECK_S:-180}" "$ENVLOG" \
  "$PY" -m fastpreact.check --json "$OUTDIR/$STEM-check.json"
stage gpu-tests "${GPU_CHECK_TESTS_S:-150}" "$OUTDIR/$STEM-gpu-tests.log" \
  "$PY" -m pytest -m gpu tests -q -ra -p no:cacheprovider
stage op-resnet200 "${GPU_CHECK_OP_S:-90}" "$BENCHLOG" \
  "${BENCH[@]}" "$OP" -k "resnet200 and not compile"
stage train-resnet200 "${GPU_CHECK_TRAIN200_S:-120}" "$BENCHLOG" \
  "${BENCH[@]}" "$TRAIN" -k "resnet200"
stage train-resnet1001 "${GPU_CHECK_TRAIN1001_S:-60}" "$BENCHLOG" \
  "${BENCH[@]}" "$TRAIN" -k "resnet1001-stock-eager or resnet1001-fused-graph"
stage op-resnet1001-and-train-rest 120 "$BENCHLOG" \
  "${BENCH[@]}" "$OP" "$TRAIN" -k "(test_op and resnet1001 and not compile) or (test_train_step and not resnet200 and not resnet1001-stock-eager and not resnet1001-fused-graph)"
stage op-compile 120 "$BENCHLOG" \
  "${BENCH[@]}" "$OP" -k "compile"
stage units-fuse-maxbatch-loaders 180 "$BENCHLOG" \
  "${BENCH[@]}" benchmarks/bench_unit.py benchmarks/bench_fuse.py benchmarks/bench_max_batch.py benchmarks/bench_loader.py

if [ -f "$OUTDIR/$STEM.json" ]; then
  "$PY" -m benchmarks.render_results --results "$OUTDIR/$STEM.json" > "$OUTDIR/$STEM-readme.md" 2>> "$ENVLOG" \
    && log "README table: $STEM-readme.md (python -m benchmarks.render_results --write puts it into README.md)"
else
  log "no results JSON was written"
fi
log "gpu_check done in $(( $(date +%s) - START )) s; files:"
ls -l "$OUTDIR" | grep -F "$STEM" | tee -a "$ENVLOG"
