#!/usr/bin/env bash
# The one GPU check, staged by what it tells: whatever the window allows, the most important
# answers come first and are already under $OUT. For a machine with Python 3.12, torch and
# triton, no network and nothing of ours: prepare what travels first
# (bash benchmarks/prepare_device.sh -> device/), then, through the device tool:
#
#   run(command="FASTRES_GIT_COMMIT=<git rev-parse --short HEAD> bash benchmarks/device_check.sh",
#       carry=["device"], timeout_s=450)
#
# (the tree travels without .git; the kernel table's entry records the commit named there).
# Stages, each with a cap in seconds (the caps and a reserve for the summary add up to at most
# BUDGET_S, 420 by default, so a rerun still fits a 15-minute device window with the machine's
# start-up; `bash benchmarks/device_check.sh --print-caps` prints them), each ending by writing
# its result file under $OUT:
#   1 machine       the GPU, the versions, ffcv's wheels installed, fastres laid out as it
#                   installs, the betons converted; stops at once (exit 3) without CUDA
#                                                                   -> 1-machine.md
#   2 main_job      python -m fastres.grid --preset smoke with every default (resident, bf16,
#                   graphs; --array auto times one run at a time, compiled, against a graphed
#                   array and trains the faster), then benchmarks/sync_check.py: two epochs of
#                   structure 1 at the defaults (resident, bf16, compiled, graphed), the second
#                   under set_sync_debug_mode("error"); then, in what the stage has left, the
#                   grid again with --array off (compiled, graphed engines reused across cells)
#                                                                   -> 2-main_job.md
#   3 ladder        benchmarks/epoch_time.py for structure 1, each rung in its own process:
#                   rungs 1, 8, 7 (the headline ratio) first, then the rest until the cap
#                                                                   -> 3-epoch_time.md
#   4 tests         natively on the GPU, with pytest-xdist (-n 8) where it imports: the kernel
#                   equivalence tests (tests/test_kernels_*.py), the graphed steps on real
#                   CUDA graphs (tests/test_graphs.py -k cuda) and the CUDA-only paths no
#                   other test reaches (tests/test_device_check.py -k cuda)
#                                                                   -> 4-tests.md
#   5 kernel_table  benchmarks/kernel_table.py for structures 1, 6, 9: the step `--kernels
#                   auto` runs (compiled, graphed), eager vs triton; trusts triton only if the
#                   kernel tests of stage 4 passed                  -> 5-kernel_table.json
#                   (the committed table with this GPU's entry: copy it over
#                   kernels/kernel_table.json to commit it)
#   6 leftovers     in what the others left: benchmarks/arrays.py (structures 1, 6), loader.py,
#                   kernels.py, grid_throughput.py --arrays 10, fidelity.py (1 epoch x 2
#                   seeds)                                          -> 6-leftovers.md
# plus device_check.log (everything printed) and raw.tar.gz (every step's own log and JSON,
# rewritten as each stage ends): never more than 8 files under $OUT, the most the device tool
# returns. No step is fatal to the rest; each is bounded by `timeout` within its stage's cap.
#
# Knobs (environment): BUDGET_S (420), CAPS (stages 1-5, comma-separated; default below),
# STAGES (which of 2-6 to run, default 2,3,4,5,6; stage 1 always runs), RUNGS (1,8,7,5,3,4,6,2),
# EPOCHS (measured epochs per rung, 2), RUNG_BUDGET (seconds per rung, 30), KTABLE_STRUCTURES
# (1,6,9), TO_BEST=1 (stage 6 runs the 200-epoch time-to-best run instead: give it a call of
# its own, `TO_BEST=1 STAGES=6 BUDGET_S=560`), PY (python3), OUT (/tmp/device_check_out),
# SMOKE=1: a dry run of every stage on a CPU machine (no stop without CUDA; every benchmark in
# its --smoke size; FASTRES_DATA should name small betons).
set -uo pipefail

# ----------------------------------------------------------------------------- the budget
BUDGET_S=${BUDGET_S:-420}
RESERVE_S=10  # after stage 6: the summary and the last tarball
GRACE_S=8     # a step's timeout ends this long before its stage's: kill-after 5 s, plus slack
NAMES=(- machine main_job ladder tests kernel_table leftovers)
IFS=, read -r -a CAP_LIST <<<"${CAPS:-50,150,100,50,55}"
WANTED=",1,${STAGES:-2,3,4,5,6},"
runs() { [[ $WANTED == *",$1,"* ]]; }
caps_total() {  # the caps of the stages that run, plus the reserve
  local s total=$RESERVE_S
  for s in 1 2 3 4 5; do
    runs "$s" && total=$(( total + ${CAP_LIST[s-1]:-0} ))
  done
  echo "$total"
}
caps_ok=1; for c in "${CAP_LIST[@]}" "$BUDGET_S"; do [[ $c =~ ^[0-9]+$ ]] || caps_ok=0; done
if [ ${#CAP_LIST[@]} -ne 5 ] || [ "$caps_ok" != 1 ]; then
  echo "[device_check] CAPS needs five numbers (stages 1-5) and BUDGET_S one, got" \
    "'${CAPS:-}' and '$BUDGET_S'" >&2
  exit 2
fi
if [ "${1:-}" = --print-caps ]; then
  echo "budget $BUDGET_S"
  echo "reserve $RESERVE_S"
  for s in 1 2 3 4 5 6; do
    cap=${CAP_LIST[s-1]:-rest}
    echo "stage $s ${NAMES[s]} $cap$(runs "$s" || echo " skipped")"
  done
  echo "total $(caps_total)"
  exit 0
fi
if [ "$(caps_total)" -gt "$BUDGET_S" ]; then
  echo "[device_check] the stage caps and the ${RESERVE_S} s reserve add up to $(caps_total) s," \
    "over BUDGET_S=$BUDGET_S: raise BUDGET_S, lower CAPS or run fewer STAGES" >&2
  exit 2
fi

# ----------------------------------------------------------------------------- set-up
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/device_check_out}
mkdir -p "$OUT"
# Everything but the 8 result files lives outside $OUT (the tool returns at most 8 files).
WORK=$(mktemp -d /tmp/device_check.XXXXXX)
RAW=$WORK/raw
mkdir -p "$RAW"
PY=${PY:-python3}
SMOKE=${SMOKE:-0}
SMOKE_FLAG=(); [ "$SMOKE" = 1 ] && SMOKE_FLAG=(--smoke)
EPOCHS=${EPOCHS:-2}
RUNG_BUDGET=${RUNG_BUDGET:-30}
# Rungs 1 (the baseline), 8 and 7 (the default path with and without resident data) first. On a
# CPU dry run rungs 6-8 would only say they need CUDA, each in a process of its own: rung 1 only.
RUNGS=${RUNGS:-$([ "$SMOKE" = 1 ] && echo 1 || echo 1,8,7,5,3,4,6,2)}
START=$(date +%s)
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export FASTRES_CACHE=${FASTRES_CACHE:-$WORK/cache}
exec > >(tee -a "$OUT/device_check.log") 2>&1
TEE_PID=$!
# The log is whole before the script's exit is seen, and the scratch folder goes.
trap 'exec >&- 2>&-; wait "$TEE_PID"; rm -rf "$WORK"' EXIT

now() { echo $(( $(date +%s) - START )); }
STAGE=0; STAGE_T0=0; STAGE_END=$(( START + BUDGET_S ))
stage_begin() {  # stage_begin N: its cap starts now (stage 6: what is left before the reserve)
  STAGE=$1; STAGE_T0=$(date +%s)
  if [ "$1" = 6 ]; then STAGE_END=$(( START + BUDGET_S - RESERVE_S ))
  elif [ "$1" = 7 ]; then STAGE_END=$(( START + BUDGET_S ))
  else STAGE_END=$(( STAGE_T0 + ${CAP_LIST[$1-1]} )); fi
  echo
  echo "=== [$(now) s] stage $1 ${NAMES[$1]:-summary}: $(( STAGE_END - STAGE_T0 )) s"
}
stage_left() { echo $(( STAGE_END - $(date +%s) )); }
# bounded WANT LOGFILE CMD...: CMD under a timeout of WANT seconds at most, ending GRACE_S before
# its stage does; skipped when under 5 s are left. Its output goes to the log and to LOGFILE.
bounded() {
  local want=$1 logf=$2; shift 2
  local l; l=$(( $(stage_left) - GRACE_S ))
  local t=$(( want < l ? want : l ))
  if [ "$t" -lt 5 ]; then
    echo "[device_check] skipped (stage ${STAGE} has ${l} s left): $*" | tee -a "$logf"
    return 124
  fi
  timeout --kill-after=5 "$t" "$@" 2>&1 | tee -a "$logf"
  local rc=${PIPESTATUS[0]}
  echo "[device_check] rc=$rc after $(( $(date +%s) - STAGE_T0 )) s of stage $STAGE" \
    "(step limit ${t} s): $*"
  return "$rc"
}
# stage_end FILE...: publish the stage's result files and the refreshed tarball under $OUT.
stage_end() {
  local f
  for f in "$@"; do
    if [ -f "$f" ]; then cp "$f" "$OUT/"; else
      echo "[device_check] stage $STAGE: $f was not written"; fi
  done
  tar -czf "$WORK/raw.tar.gz" -C "$WORK" raw && mv -f "$WORK/raw.tar.gz" "$OUT/raw.tar.gz"
  local n; n=$(find "$OUT" -type f | wc -l)
  echo "[device_check] stage $STAGE ${NAMES[$STAGE]:-summary} done after $(( $(date +%s) \
- STAGE_T0 )) s (limit $(( STAGE_END - STAGE_T0 )) s), at $(now) s: wrote" \
    "$(for f in "$@"; do printf '%s ' "${f##*/}"; done)raw.tar.gz; \$OUT holds $n files"
  [ "$n" -le 8 ] || echo "[device_check] WARNING: $n files under \$OUT; the tool returns 8"
}
# md_section TITLE FILE: FILE's text under a heading, or a line saying it is missing.
md_section() {
  echo; echo "## $1"; echo
  if [ -s "$2" ]; then cat "$2"; else echo "(not written: see device_check.log)"; fi
}
log_tail() {  # log_tail FILE N: the last N lines, fenced
  echo '```'; tail -n "$2" "$1" 2>/dev/null; echo '```'
}

# ----------------------------------------------------------------------------- 1 machine
stage_begin 1
M=$RAW/1-machine.md
{ echo "# Stage 1: the machine"; echo; echo "started $(date -u +%FT%TZ); budget ${BUDGET_S} s;" \
  "stages $(echo "${WANTED:1:-1}"); SMOKE=$SMOKE"; echo; echo '```'; } >"$M"
bounded 10 "$M" nvidia-smi \
  --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
bounded 40 "$M" "$PY" - "$SMOKE" <<'EOF'
import platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available",
      torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for m in ("triton", "xdist", "numba", "llvmlite", "numpy", "cv2", "torchvision", "PIL"):
    try:
        mod = __import__(m); print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "missing:", type(e).__name__, e)
# Without CUDA nothing below measures anything (the kernel tests would crawl through the
# interpreter): the script stops here, unless this is the CPU dry run.
sys.exit(0 if torch.cuda.is_available() or sys.argv[1] == "1" else 3)
EOF
CUDA_RC=$?
# The device tool copies the tree without .git: the caller names the commit instead (the
# kernel table's entry must record one to be committed).
if GIT_COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null); then
  export FASTRES_GIT_COMMIT=$GIT_COMMIT
elif [ -n "${FASTRES_GIT_COMMIT:-}" ]; then
  GIT_COMMIT="$FASTRES_GIT_COMMIT (from FASTRES_GIT_COMMIT)"
else
  GIT_COMMIT="unknown: no .git here; pass FASTRES_GIT_COMMIT=<git rev-parse --short HEAD>"
fi
echo "git $GIT_COMMIT" | tee -a "$M"
if [ "$CUDA_RC" != 0 ]; then
  { echo '```'; echo; echo "STOP: torch sees no CUDA GPU here (probe rc=$CUDA_RC); nothing" \
    "else was run. SMOKE=1 is the CPU dry run."; } | tee -a "$M"
  stage_end "$M"
  exit 3
fi

SITE=$WORK/site
mkdir -p "$SITE"
if ls device/wheels/*.whl >/dev/null 2>&1; then
  bounded 40 "$M" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" device/wheels/*.whl || echo "[device_check] ffcv wheels did not install"
else
  echo "[device_check] no device/wheels: run benchmarks/prepare_device.sh and carry device/" \
    | tee -a "$M"
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
# pyproject maps fastres.loaders/.kernels onto the top-level loaders/ and kernels/. Without an
# editable install the checkout's own fastres/ (first on sys.path for scripts and pytest) would
# shadow an installed copy, so everything runs from a copy of the tree laid out as it installs.
TREE=$WORK/tree
mkdir -p "$TREE"
cp -r fastres tests benchmarks pyproject.toml "$TREE"/
cp -r loaders "$TREE/fastres/loaders" && cp -r kernels "$TREE/fastres/kernels"
[ -d device ] && ln -s "$ROOT/device" "$TREE/device"
[ -e .git ] && ln -s "$ROOT/.git" "$TREE/.git"  # results and the kernel table record the commit
cd "$TREE"
DATA=${FASTRES_DATA:-$ROOT/device/data/cifar10-jpeg.tar.gz}
if [ -e "$DATA" ]; then export FASTRES_DATA=$DATA; else
  echo "[device_check] no data at $DATA: the steps that need it will say so" | tee -a "$M"; fi
# ffcv and fastres import, and the betons are converted once here (cached in FASTRES_CACHE), so
# that the stages after this one time what they run, not the conversion.
bounded 60 "$M" "$PY" - <<'EOF'
import fastres, fastres.kernels, fastres.loaders.augment
print("fastres", fastres.__file__)
try:
    import ffcv.loader, ffcv.transforms, ffcv.writer
    print("ffcv", ffcv.__file__)
except Exception as e:
    raise SystemExit(f"ffcv does not import ({type(e).__name__}: {e}): what needs it says so")
import time
from fastres.study.data import prepare
t0 = time.perf_counter()
pair = prepare(log=print)
print(f"data: {pair.kind} {pair.source}: {pair.num_train} train / {pair.num_test} test images, "
      f"betons ready in {time.perf_counter() - t0:.1f} s")
EOF
echo '```' >>"$M"
stage_end "$M"

# ----------------------------------------------------------------------------- 2 main job
if runs 2; then
  stage_begin 2
  J=$RAW/2-main_job.md
  # The user's command: every default, nothing but the preset (on a GPU --array auto times a
  # compiled, graphed run against a graphed array of the four cells and trains the faster).
  # The sync check after it keeps at least 80 s: structure 1 compiles for three batch shapes
  # before its first epoch ends.
  g0=$(date +%s)
  bounded $(( $(stage_left) - 2 * GRACE_S - 80 )) "$RAW/grid_smoke.log" \
    "$PY" -m fastres.grid --preset smoke
  grid_rc=$?; grid_s=$(( $(date +%s) - g0 ))
  sync_flags=(--json "$RAW/sync_check.json")
  [ "$SMOKE" = 1 ] && sync_flags+=(--smoke)
  bounded 100 "$RAW/sync_check.log" "$PY" benchmarks/sync_check.py "${sync_flags[@]}"
  sync_rc=$?
  # Then, in what the stage has left, the same grid one cell at a time: compiled, graphed
  # engines, each reused by the next cell of its optimizer (the workbench's engine reuse).
  g0=$(date +%s)
  if [ "$SMOKE" = 1 ]; then  # on a CPU it shows nothing the default grid did not (seconds)
    solo_rc="not run (dry run)"; echo "$solo_rc" >"$RAW/grid_solo.log"
  else
    bounded 300 "$RAW/grid_solo.log" "$PY" -m fastres.grid --preset smoke --array off \
      --results runs-solo
    solo_rc=$?
  fi
  solo_s=$(( $(date +%s) - g0 ))
  {
    echo "# Stage 2: the main job as a user runs it"
    echo
    echo "## python -m fastres.grid --preset smoke (every default)"
    echo
    echo "$([ "$grid_rc" = 0 ] && echo PASS || echo FAIL): rc $grid_rc after $grid_s s"
    echo
    log_tail "$RAW/grid_smoke.log" 25
    echo
    echo "## sync check: structure 1, 2 epochs at the defaults, epoch 2 under" \
      "set_sync_debug_mode(\"error\")"
    echo
    grep '^sync check:' "$RAW/sync_check.log" || echo "sync check: FAIL (rc $sync_rc, no verdict)"
    echo
    log_tail "$RAW/sync_check.log" 40
    echo
    echo "## python -m fastres.grid --preset smoke --array off (one cell at a time, warm engines)"
    echo
    case $solo_rc in
      0) echo "PASS: rc 0 after $solo_s s" ;;
      124) echo "NOT RUN or STOPPED (rc 124 after $solo_s s): the stage's time was spent" ;;
      [0-9]*) echo "FAIL: rc $solo_rc after $solo_s s" ;;
      *) echo "$solo_rc" ;;
    esac
    echo
    log_tail "$RAW/grid_solo.log" 25
  } >"$J"
  stage_end "$J"
fi

# ----------------------------------------------------------------------------- 3 ladder
if runs 3; then
  stage_begin 3
  # --deadline inside the step's limit: rungs it has no time for are skipped (and say so), a
  # running one is stopped, and the table is written after every rung.
  et_t=$(( $(stage_left) - GRACE_S ))
  # A dry run keeps rung 1 in the parent process: one process fewer (its own test isolates).
  et_flags=(--structures 1 --isolate); [ "$SMOKE" = 1 ] && et_flags=(--smoke --train-subset 256 \
    --test-subset 128)
  bounded "$et_t" "$RAW/epoch_time.log" "$PY" benchmarks/epoch_time.py "${et_flags[@]}" \
    --warmup 1 --epochs "$EPOCHS" --rung-budget "$RUNG_BUDGET" --rungs "$RUNGS" \
    --deadline $(( et_t > 20 ? et_t - 10 : 10 )) \
    --json "$RAW/epoch_time.json" --md "$RAW/3-epoch_time.md"
  stage_end "$RAW/3-epoch_time.md"
fi

# ----------------------------------------------------------------------------- 4 tests
KTESTS_OK=0  # 1 only when the kernel equivalence tests ran here natively and all passed
KT_SUMMARY="not run"
if runs 4; then
  stage_begin 4
  unset TRITON_INTERPRET
  # The kernel tests whole; of the others only what runs on CUDA (test_graphs.py's real-graph
  # cases, test ids with "cuda"): -k keeps a test whose name or module's name matches.
  shopt -s nullglob
  tests=(tests/test_kernels_*.py tests/test_graphs.py tests/test_device_check.py
         tests/test_*cuda*.py)
  # On a CPU the kernel tests would crawl through the interpreter, and test_device_check.py's
  # no-CUDA cases would run this script again; the rest select nothing there.
  [ "$SMOKE" = 1 ] && tests=(tests/test_graphs.py tests/test_*cuda*.py)
  shopt -u nullglob
  xdist=(); "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
  if [ ${#tests[@]} -gt 0 ]; then  # never pytest with no paths: that is the whole suite
    bounded 600 "$RAW/tests.log" "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" \
      -k "cuda or test_kernels_" --junitxml "$RAW/tests.xml" "${tests[@]}"
  else
    echo "[device_check] no kernel or CUDA test files in this checkout" | tee -a "$RAW/tests.log"
  fi
  # Per file group from the JUnit report: the verdict for the kernel table comes from the
  # kernel tests alone, and a run where every test skipped proves nothing.
  read -r KTESTS_OK KT_SUMMARY < <("$PY" - "$RAW/tests.xml" "$RAW/4-tests.md" <<'EOF'
import sys
import xml.etree.ElementTree as ET
from collections import Counter
path, md = sys.argv[1], sys.argv[2]
groups = {"kernel equivalence (tests/test_kernels_*.py)": Counter(),
          "CUDA-only paths (test_graphs.py, test_device_check.py, -k cuda)": Counter()}
failed = []
try:
    cases = ET.parse(path).getroot().iter("testcase")
except (OSError, ET.ParseError) as e:
    cases, failed = [], [f"no JUnit report ({type(e).__name__}: {e})"]
for case in cases:
    # A module that fails to import is reported with no class and the module as its name.
    name = "::".join(filter(None, (case.get("classname"), case.get("name"))))
    group = list(groups)[0 if ".test_kernels_" in f".{name}" else 1]
    kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
    groups[group][kind] += 1
    if kind in ("failure", "error"):
        failed.append(name)
lines = ["# Stage 4: native tests on the GPU", "", "| tests | passed | failed | errors | skipped |",
         "|---|---|---|---|---|"]
for g, c in groups.items():
    lines.append(f"| {g} | {c['passed']} | {c['failure']} | {c['error']} | {c['skipped']} |")
lines += ["", *(f"- FAILED {f}" for f in failed)]
open(md, "w").write("\n".join(lines) + "\n")
k = groups["kernel equivalence (tests/test_kernels_*.py)"]
ok = int(k["passed"] > 0 and not (k["failure"] or k["error"]))
print(ok, f"{k['passed']} passed, {k['failure']} failed, {k['error']} errors, "
      f"{k['skipped']} skipped")
EOF
)
  KTESTS_OK=${KTESTS_OK:-0}; KT_SUMMARY=${KT_SUMMARY:-"no report"}
  { echo; echo "kernel equivalence verdict for the kernel table: $([ "$KTESTS_OK" = 1 ] \
    && echo passed || echo "not passed") ($KT_SUMMARY)"; echo; log_tail "$RAW/tests.log" 30; } \
    >>"$RAW/4-tests.md"
  stage_end "$RAW/4-tests.md"
fi

# ----------------------------------------------------------------------------- 5 kernel table
if runs 5; then
  stage_begin 5
  KT=$RAW/5-kernel_table.json
  if [ "$SMOKE" = 1 ]; then
    kt_flags=(--smoke)  # eager only, device "cpu-smoke", never the package's table
  else
    kt_flags=(--structures "${KTABLE_STRUCTURES:-1,6,9}")
    [ "$KTESTS_OK" = 1 ] && kt_flags+=(--equivalence-passed --equivalence-summary "$KT_SUMMARY")
    # The committed table (kernels/ sits in the tree as it installs), this GPU's entry merged in.
    cp fastres/kernels/kernel_table.json "$KT"
  fi
  kt_t=$(( $(stage_left) - GRACE_S ))
  # --deadline: a structure that would start after it is skipped (and the row says so); the
  # table is rewritten after each, so a cut-short run keeps what it measured.
  bounded "$kt_t" "$RAW/kernel_table.log" "$PY" benchmarks/kernel_table.py "${kt_flags[@]}" \
    --deadline $(( kt_t > 40 ? kt_t - 30 : 10 )) --out "$KT"
  kt_rc=$?  # 2: it refused (no GPU, a bad table) and wrote nothing
  if [ "$SMOKE" != 1 ] && [ "$kt_rc" != 2 ] && [ -f "$KT" ]; then
    cp "$KT" fastres/kernels/kernel_table.json  # stage 6 runs with what auto now picks here
  fi
  stage_end "$KT"
fi

# ----------------------------------------------------------------------------- 6 leftovers
if runs 6; then
  stage_begin 6
  L=$RAW/6-leftovers.md
  if [ "${TO_BEST:-0}" = 1 ]; then
    bounded 600 "$RAW/to_best.log" "$PY" benchmarks/epoch_time.py --to-best --structures 1 \
      "${SMOKE_FLAG[@]}" --json "$RAW/to_best.json" --md "$RAW/to_best.md"
    { echo "# Stage 6: time to the paper's best"; md_section "epoch_time.py --to-best" \
      "$RAW/to_best.md"; } >"$L"
  else
    # arrays.py: --budget-s inside its limit makes it skip (and say so) the cells it has no
    # time for and still write its table.
    ar_t=$(( $(stage_left) - GRACE_S )); ar_t=$(( ar_t < 90 ? ar_t : 90 ))
    ar_flags=(--structures 1,6 --sizes 1,2,5,10); [ "$SMOKE" = 1 ] && ar_flags=(--smoke \
      --sizes 1,2)
    bounded "$ar_t" "$RAW/arrays.log" "$PY" benchmarks/arrays.py "${ar_flags[@]}" \
      --budget-s $(( ar_t > 45 ? ar_t - 25 : 10 )) --json "$RAW/arrays.json" --md "$RAW/arrays.md"
    lo_flags=(--images 16384 --epochs 2); [ "$SMOKE" = 1 ] && lo_flags=(--smoke --images 256 \
      --epochs 1 --pipelines fastres-resident)
    bounded 90 "$RAW/loader.log" "$PY" benchmarks/loader.py "${lo_flags[@]}" \
      --json "$RAW/loader.json" --md "$RAW/loader.md"
    if [ "$SMOKE" = 1 ]; then
      echo "[device_check] kernels.py, grid_throughput.py --arrays, fidelity.py: not in the" \
        "dry run (their own tests run them)"
    else
      # Each fused kernel against its eager form; rows print as they finish.
      kb_t=$(( $(stage_left) - GRACE_S )); kb_t=$(( kb_t < 90 ? kb_t : 90 ))
      bounded "$kb_t" "$RAW/kernels.log" "$PY" benchmarks/kernels.py \
        --budget-s $(( kb_t > 40 ? kb_t - 30 : 10 ))
      for s_ in ${ARRAY_STRUCTURES:-1 6}; do
        bounded 150 "$RAW/grid_arrays_$s_.log" "$PY" benchmarks/grid_throughput.py \
          --structure "$s_" --train-subset 10000 --test-subset 2000 --arrays 10 \
          --epochs "${ARRAY_EPOCHS:-3}" --timeout 140 \
          --json "$RAW/grid_arrays_$s_.json" --md "$RAW/grid_arrays_$s_.md"
      done
      # fastres against the paper's loop at the GPU defaults: one epoch, two seeds.
      [ -f benchmarks/fidelity.py ] && bounded 150 "$RAW/fidelity.log" "$PY" \
        benchmarks/fidelity.py --structure 1 --epochs 1 --seeds 0-1 \
        --json "$RAW/fidelity.json" --md "$RAW/fidelity.md"
    fi
    {
      echo "# Stage 6: in what was left"
      md_section "arrays.py: R runs one at a time vs one run array" "$RAW/arrays.md"
      md_section "loader.py" "$RAW/loader.md"
      if [ "$SMOKE" != 1 ]; then
        echo; echo "## kernels.py"; echo; log_tail "$RAW/kernels.log" 40
        for f in "$RAW"/grid_arrays_*.md "$RAW"/fidelity.md; do
          [ -f "$f" ] && md_section "${f##*/}" "$f"
        done
      fi
    } >"$L"
  fi
  stage_end "$L"
fi

# ----------------------------------------------------------------------------- summary
stage_begin 7
bounded 5 "$RAW/summary.log" nvidia-smi \
  --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
for f in "$RAW"/2-main_job.md "$RAW"/3-epoch_time.md "$RAW"/4-tests.md; do
  [ -f "$f" ] && grep -E '^(sync check:|PASS|FAIL|\|)' "$f"
done
[ -f "$RAW/kernel_table.log" ] && grep -E '^(\||# kernel table)' "$RAW/kernel_table.log"
echo "[device_check] total $(now) s of a ${BUDGET_S} s budget"
stage_end
