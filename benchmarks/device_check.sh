#!/usr/bin/env bash
# Everything this project measures on a GPU, in one call of about 8 minutes, on a machine that has
# Python 3.12 with torch and triton, no network, and nothing of ours. Prepare what travels here
# first (bash benchmarks/prepare_device.sh -> device/), then, through the device tool:
#
#   run(command="bash benchmarks/device_check.sh", carry=["device"], timeout_s=560)
#
# Steps, each bounded by `timeout` and none fatal to the rest: install the ffcv wheels from
# device/wheels and lay fastres out in /tmp as it installs; the kernel equivalence tests natively
# on the GPU; benchmarks/kernel_table.py (a training step per structure, eager vs triton: the
# table `--kernels auto` reads, trusting the kernels only if those tests passed);
# benchmarks/kernels.py; loader.py over the training set; epoch_time.py for structure 1, each
# rung in its own process (a few epochs per rung); then, only in the time the budget has left,
# benchmarks/arrays.py (structures 1 and 6, R = 1, 2, 5, 10: one training step of R runs one at
# a time vs one run array, grouped and per-run; at most 90 s), and grid_throughput.py --arrays 10
# for structures 1 and 6 (the grid itself, one at a time vs one array of the ten runs, at most
# 150 s each, ARRAY_STRUCTURES / ARRAY_EPOCHS). Raw outputs go under $OUT: the
# log, the JSON + Markdown of loader and epoch_time, arrays.md, kernel_table.json (the committed
# table plus this GPU's entry: copy it to fastres/kernel_table.json to commit it), and one
# tarball of everything else, arrays.json included (the device tool returns at most 8 files:
# these are 8; with TO_BEST=1, whose to_best.json is one more, arrays.md goes in the tarball
# too). If ffcv does not install, the rungs and loaders that need it say so in their rows and
# the rest still run.
#
# Knobs (environment): BUDGET_S (default 500, the whole script), EPOCHS (measured epochs per
# rung, 2), RUNG_BUDGET (seconds per rung, 45), STRUCTURES (1), RUNGS (1,8,7,5,3,4,6,2), TO_BEST=1 adds the 200-epoch run
# (structure 1, SGD) if the budget still allows it, PY (python3), SMOKE=1 passes --smoke to the
# benchmarks (a dry run of this script on a CPU machine), KTABLE_STRUCTURES (1-9) and
# KTABLE_BUDGET (seconds, 120) for kernel_table.py.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/device_check_out}
RAW=$OUT/raw
mkdir -p "$RAW"
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-500}
EPOCHS=${EPOCHS:-2}
RUNG_BUDGET=${RUNG_BUDGET:-45}
SMOKE_FLAG=(); [ "${SMOKE:-0}" = 1 ] && SMOKE_FLAG=(--smoke)
# Rung order: rung 1 (the baseline of every speedup) and the fastest first, so a deadline cuts the
# rungs that tell least. Tables sort by rung.
RUNGS=${RUNGS:-1,8,7,5,3,4,6,2}
STRUCTURES=${STRUCTURES-$([ "${SMOKE:-0}" = 1 ] || echo 1)}  # smoke: its tiny spec
STRUCT_FLAG=(); [ -n "$STRUCTURES" ] && STRUCT_FLAG=(--structures "$STRUCTURES")
START=$(date +%s)
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export FASTRES_CACHE=${FASTRES_CACHE:-/tmp/fastres-cache}
exec > >(tee -a "$OUT/device_check.log") 2>&1

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
step() { echo; echo "=== [$(( $(date +%s) - START )) s] $*"; }
# bounded STEP_SECONDS LOGFILE CMD...: run with a timeout that never passes the script's budget.
bounded() {
  local want=$1 logf=$2; shift 2
  local l; l=$(left)
  local t=$(( want < l - 15 ? want : l - 15 ))
  if [ "$t" -lt 20 ]; then echo "[device_check] skipped (budget spent): $*"; return 124; fi
  timeout --kill-after=10 "$t" "$@" 2>&1 | tee "$logf"
  local rc=${PIPESTATUS[0]}
  echo "[device_check] rc=$rc after <= ${t}s: $*"
  return "$rc"
}

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
"$PY" - <<'EOF' || true
import platform, sys, torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton missing:", e)
for m in ("numba", "llvmlite", "numpy", "cv2", "cupy", "torchvision", "PIL"):
    try:
        mod = __import__(m); print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "missing:", type(e).__name__, e)
EOF
git -C "$ROOT" log -1 --oneline 2>/dev/null || echo "(no git metadata travelled)"

step "install ffcv (device/wheels); lay fastres out as it installs"
SITE=/tmp/fastres-site
mkdir -p "$SITE"
if ls device/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" device/wheels/*.whl || echo "[device_check] ffcv wheels did not install"
else
  echo "[device_check] no device/wheels: run benchmarks/prepare_device.sh here and carry device/"
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
# pyproject maps fastres.loaders/.kernels onto the top-level loaders/ and kernels/. Without an
# editable install the checkout's own fastres/ (first on sys.path for scripts and pytest) would
# shadow any installed copy, so run from a copy of the tree laid out the way it installs.
TREE=/tmp/fastres-tree
rm -rf "$TREE" && mkdir -p "$TREE"
cp -r fastres tests benchmarks pyproject.toml "$TREE"/
cp -r loaders "$TREE/fastres/loaders" && cp -r kernels "$TREE/fastres/kernels"
ln -s "$ROOT/device" "$TREE/device"
cd "$TREE"
FFCV_OK=0
if "$PY" -c "import ffcv.loader, ffcv.writer, ffcv.transforms; print('ffcv', ffcv.__file__)"; then
  FFCV_OK=1
else
  echo "[device_check] ffcv does not import: its rungs and loaders will say so and be skipped"
fi
"$PY" -c "import fastres, fastres.loaders.augment, fastres.kernels; print('fastres', fastres.__file__)" \
  || echo "[device_check] fastres does not import: the steps below will fail"

DATA=${FASTRES_DATA:-$ROOT/device/data/cifar10-jpeg.tar.gz}
if [ -f "$DATA" ]; then export FASTRES_DATA=$DATA; else
  echo "[device_check] no data at $DATA: the benchmarks will say so"; fi

step "kernel equivalence tests, natively on the GPU (no TRITON_INTERPRET)"
unset TRITON_INTERPRET
shopt -s nullglob
ktests=(tests/test_kernels_*.py)
KTESTS_RC="not run"  # 0 only when every kernel equivalence test passed natively here
if [ ${#ktests[@]} -gt 0 ]; then
  bounded 150 "$RAW/kernel_tests.log" "$PY" -m pytest -q -p no:cacheprovider "${ktests[@]}"
  KTESTS_RC=$?
else
  echo "[device_check] no tests/test_kernels_*.py in this checkout"
fi

step "benchmarks/kernel_table.py: a training step per structure, eager vs triton (--kernels auto)"
# Merges this GPU's entry into a copy of the committed table under $OUT (commit it by copying it
# to fastres/kernel_table.json), and into the tree the later steps import, so they choose from
# it too. The entry trusts the kernels only when the tests above passed (exit code 0).
if [ -f benchmarks/kernel_table.py ]; then
  KT_FLAGS=()
  KT_SUMMARY=$(tail -n 1 "$RAW/kernel_tests.log" 2>/dev/null | sed 's/^[= ]*//; s/[= ]*$//')
  # Exit code 0 and some test passed: a run where every test skipped proves nothing.
  if [ "$KTESTS_RC" = 0 ] && [[ "$KT_SUMMARY" == *" passed"* ]]; then
    KT_FLAGS=(--equivalence-passed --equivalence-summary "$KT_SUMMARY")
  else
    echo "[device_check] kernel equivalence tests: rc=$KTESTS_RC ($KT_SUMMARY), so the entry" \
      "says not passed"
  fi
  if [ "${SMOKE:-0}" = 1 ]; then
    KT_FLAGS=(--smoke)  # a CPU dry run: eager only, device "cpu-smoke", never the package's
  else
    KT_FLAGS+=(--structures "${KTABLE_STRUCTURES:-1-9}")
    cp fastres/kernel_table.json "$OUT/kernel_table.json" 2>/dev/null || true
  fi
  KT_WANT=${KTABLE_BUDGET:-120}
  KT_T=$(( KT_WANT < $(left) - 15 ? KT_WANT : $(left) - 15 ))
  # --deadline inside the step's timeout: structures it has no time for are skipped (and it
  # says so), and the table is rewritten after each, so a cut-short run keeps what it measured.
  bounded "$KT_WANT" "$RAW/kernel_table.log" "$PY" benchmarks/kernel_table.py "${KT_FLAGS[@]}" \
    --deadline $(( KT_T > 60 ? KT_T - 40 : 20 )) --out "$OUT/kernel_table.json"
  KT_RC=$?  # 2: it refused (no GPU, a bad table) and wrote nothing
  if [ "${SMOKE:-0}" != 1 ] && [ "$KT_RC" != 2 ] && [ -f "$OUT/kernel_table.json" ]; then
    cp "$OUT/kernel_table.json" fastres/kernel_table.json \
      && echo "[device_check] $TREE/fastres/kernel_table.json now holds what was measured here"
  fi
else
  echo "[device_check] no benchmarks/kernel_table.py in this checkout"
fi

step "graphed training steps vs eager, all five optimizers (tests/test_steps_cuda.py)"
if [ -f tests/test_steps_cuda.py ]; then
  bounded 120 "$RAW/steps_tests.log" "$PY" -m pytest -q -p no:cacheprovider tests/test_steps_cuda.py
else
  echo "[device_check] no tests/test_steps_cuda.py in this checkout"
fi

step "benchmarks/kernels.py"
if [ -f benchmarks/kernels.py ]; then
  # shellcheck disable=SC2086
  bounded 90 "$RAW/kernels.log" "$PY" benchmarks/kernels.py ${KERNELS_ARGS:-${SMOKE_FLAG[@]}}
else
  echo "[device_check] no benchmarks/kernels.py in this checkout"
fi

step "benchmarks/loader.py (training set, 3 passes)"
bounded 120 "$RAW/loader.log" "$PY" benchmarks/loader.py --epochs 3 "${SMOKE_FLAG[@]}" \
  --json "$OUT/loader.json" --md "$OUT/loader.md"

step "benchmarks/epoch_time.py structure ${STRUCTURES:-smoke}, every rung in its own process"
# --deadline inside the step's timeout: the script then skips (and says so) rungs it has no time
# for, and writes its table after every rung, so a cut-short run still reports what it measured.
ET_LEFT=$(( $(left) - 25 )); ET_DEADLINE=$(( ET_LEFT < 400 ? ET_LEFT : 400 ))
bounded 420 "$RAW/epoch_time.log" "$PY" benchmarks/epoch_time.py "${STRUCT_FLAG[@]}" \
  --isolate --warmup 1 --epochs "$EPOCHS" --rung-budget "$RUNG_BUDGET" "${SMOKE_FLAG[@]}" \
  --deadline "$ET_DEADLINE" --rungs "$RUNGS" \
  --json "$OUT/epoch_time.json" --md "$OUT/epoch_time.md"

step "benchmarks/arrays.py: R runs one at a time vs one run array (what the budget has left)"
# After epoch_time, so it only takes time left over; --budget-s inside the step's timeout makes
# it skip (and say so) the cells it has no time for and still print and write its table.
AR_MD=$OUT/arrays.md; [ "${TO_BEST:-0}" = 1 ] && AR_MD=$RAW/arrays.md  # at most 8 files back
AR_T=$(( 90 < $(left) - 15 ? 90 : $(left) - 15 ))
bounded 90 "$RAW/arrays.log" "$PY" benchmarks/arrays.py --structures 1,6 --sizes 1,2,5,10 \
  "${SMOKE_FLAG[@]}" --budget-s $(( AR_T > 45 ? AR_T - 25 : 20 )) \
  --json "$RAW/arrays.json" --md "$AR_MD"

step "benchmarks/grid_throughput.py --arrays: a structure's ten runs one at a time vs one array"
# Issue 10's GPU figure: structures 1 and 6, the grid command itself (--array off vs --array 10),
# a few epochs on a subset; each row's peak device memory comes from the runs' records.
for s_ in ${ARRAY_STRUCTURES:-1 6}; do
  [ "${SMOKE:-0}" = 1 ] && GT_SEL=(--smoke) || GT_SEL=(--structure "$s_" --train-subset 10000 \
    --test-subset 2000)
  bounded 150 "$RAW/grid_arrays_$s_.log" "$PY" benchmarks/grid_throughput.py "${GT_SEL[@]}" \
    --arrays 10 --epochs "${ARRAY_EPOCHS:-3}" --timeout 140 \
    --json "$RAW/grid_arrays_$s_.json" --md "$RAW/grid_arrays_$s_.md"
  [ "${SMOKE:-0}" = 1 ] && break
done

if [ "${TO_BEST:-0}" = 1 ]; then
  step "time to the paper's best: structure 1, SGD, 200 epochs"
  bounded 600 "$RAW/to_best.log" "$PY" benchmarks/epoch_time.py --to-best --structures 1 \
    "${SMOKE_FLAG[@]}" \
    --json "$OUT/to_best.json" --md "$RAW/to_best.md"
fi

step "summary"
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv || true
[ -f "$RAW/kernel_table.log" ] && grep -E '^(\||# kernel table)' "$RAW/kernel_table.log"
for f in "$OUT/loader.md" "$OUT/epoch_time.md" "$RAW"/grid_arrays_*.md "$RAW/to_best.md"; do
  [ -f "$f" ] && cat "$f"
done
echo "[device_check] ffcv installed: $FFCV_OK; total $(( $(date +%s) - START )) s"
tar -czf "$OUT/raw.tar.gz" -C "$OUT" raw && rm -rf "$RAW"
