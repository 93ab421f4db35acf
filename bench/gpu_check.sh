#!/usr/bin/env bash
# GPU check: on a CUDA machine with only torch preinstalled, install the carried wheels, run the
# GPU correctness checks, then t2i-bench for the small and base presets, writing JSON into
# bench/results/. Finishes within T2I_BUDGET_S seconds (default 470, under 8 minutes): steps
# run in order of importance and a step that would not fit is skipped and listed as skipped.
#
#   bash bench/fetch_wheels.sh        # first, on a machine with a package index (once)
#   bash bench/gpu_check.sh           # on the GPU machine, from anywhere in the checkout
#
# Environment: PYTHON (default python3), T2I_WHEELS (default bench/wheels),
# T2I_BUDGET_S (default 470), OUT (if set, a tarball of the new results is written there).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${T2I_WHEELS:-bench/wheels}
BUDGET=${T2I_BUDGET_S:-470}
START=$SECONDS
export PYTHONUNBUFFERED=1

# --- 1. carried wheels (open_clip_torch, datasets and their small dependencies) -------------
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/t2i-site "$WHEELS"/*.whl || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH="$PWD:/tmp/t2i-site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import open_clip, torch; assert torch.cuda.is_available(), 'no CUDA device'"; then
  echo "missing open_clip or CUDA: run bash bench/fetch_wheels.sh where pip works and carry $WHEELS"
  exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

SLUG=$("$PY" -c "from bench import core; print(core.machine_slug(core.environment(core.BenchContext(device='cuda'))))")
DATE=$(date -u +%F)
RESULTS=bench/results
SUMMARY=$RESULTS/gpu-check-$SLUG-$DATE.txt
mkdir -p "$RESULTS"
: >"$SUMMARY"
FAILED=0

# step NAME MAX_S COMMAND...: run with a timeout of min(MAX_S, what is left of the budget);
# skipped when under 45 s would be left for it.
step() {
  local name=$1 max=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((max < left ? max : left))
  if ((limit < 45)); then
    printf '%-28s skipped (budget)\n' "$name" | tee -a "$SUMMARY"
    return
  fi
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local verdict=ok
  ((rc == 124 || rc == 137)) && verdict="timed out"
  ((rc != 0 && rc != 124 && rc != 137)) && verdict="failed (exit $rc)"
  [[ $verdict == ok ]] || FAILED=1
  printf '%-28s %-18s %4ds  %s\n' "$name" "$verdict" $((SECONDS - t0)) "$*" | tee -a "$SUMMARY"
}

opts() {  # opts CASE PRESET RES [TAG]: shared t2i-bench options; bf16; JSON named by all four
  echo "--device cuda --dtype bf16 --preset $2 --resolution $3" \
       "--json $RESULTS/$1-$2-$3${4:+-$4}-$SLUG-$DATE.json"
}

# --- 2. correctness: AMP bf16 vs fp32, compiled vs eager, CUDA-graph sampling vs eager --------
step checks 150 "$PY" -m bench.gpu_checks --device cuda --preset small --resolution 128 \
  --steps 10 --json "$RESULTS/gpu-checks-small-$SLUG-$DATE.json"
# --- 3. benchmarks, most important first --------------------------------------------------------
# goal: >= 40% MFU for the base UNet training step at 256x256 in bf16
step "train-step base 256" 150 "$PY" -m bench train-step $(opts train-step base 256) --repeats 10
# goal: 50-step PNDM with guidance, base at 512x512, batch 1, under 0.35 s
step "sample base 512 b1" 120 "$PY" -m bench sample $(opts sample base 512 b1) --batch 1 --repeats 5 --warmup 1
step "unet small 256" 90 "$PY" -m bench unet $(opts unet small 256) --repeats 10
step "unet base 512" 120 "$PY" -m bench unet $(opts unet base 512) --repeats 5
step "sample base 512 b16" 150 "$PY" -m bench sample $(opts sample base 512 b16) --batch 16 --repeats 3 --warmup 1
step "sample small 256" 120 "$PY" -m bench sample $(opts sample small 256) --repeats 5 --warmup 1

echo
echo "GPU check summary ($((SECONDS - START)) s of a ${BUDGET} s budget):"
cat "$SUMMARY"
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
  tar czf "$OUT/gpu-results.tgz" "$RESULTS"/*"$SLUG-$DATE"* && echo "results: $OUT/gpu-results.tgz"
fi
exit $FAILED
