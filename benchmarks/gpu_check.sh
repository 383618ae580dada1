#!/usr/bin/env bash
# The GPU check, one call on a lent GPU machine (torch 2.11, Python 3.12, no network):
#   build in place, the CUDA tests, a compute-sanitizer run of every kernel, and the
#   benchmark on ResNet-stage shapes (float32 and bfloat16, both layouts, K = 1, 2, 4).
# Logs and JSON go to $OUT (default: ./gpu_check_out); a short table is printed last.
# The stages have time limits that add up to under 8 minutes.
#
#   bash benchmarks/gpu_check.sh
#   CBN_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh   # the same steps, small, on the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEV=${CBN_CHECK_DEVICE:-cuda}
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.log"
: > "$SUMMARY"
say() { echo "== $(date +%T) $*" | tee -a "$SUMMARY"; }
status=0

say "machine"
{
  nvidia-smi 2>&1 || true
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
} > "$OUT/machine.log" 2>&1
tail -3 "$OUT/machine.log" | tee -a "$SUMMARY"

say "build (in place)"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
[ "$DEV" = cuda ] && export FORCE_CUDA=1
if ! timeout 150 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  say "BUILD FAILED (see build.log)"
  exit 1
fi
warnings=$(grep -ci "warning" "$OUT/build.log" || true)
say "built; lines with 'warning': $warnings; $("$PY" -c 'import cbn_ext; print(cbn_ext.build_info())')"

if [ "$DEV" = cuda ]; then
  TEST_SELECT=(-k cuda)
  SMOKE_DEVICE=cuda
  BENCH_ARGS=(--device cuda --dtypes float32,bfloat16 --K 1,2,4 --repeats 20 --warmup 5)
else
  TEST_SELECT=(-k "cpu and (test_opcheck or test_deterministic or test_k1_is_batch_norm)")
  SMOKE_DEVICE=cpu
  BENCH_ARGS=(--device cpu --shapes 4x16x8x8 --dtypes float32,bfloat16 --K 1,2 --repeats 3 --warmup 1)
fi

say "tests (${TEST_SELECT[*]}, not slow)"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider --maxfail=30 "${TEST_SELECT[@]}" -m "not slow" tests \
  > "$OUT/tests.log" 2>&1 || status=1
tail -1 "$OUT/tests.log" | tee -a "$SUMMARY"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20 | tee -a "$SUMMARY"

if [ "$DEV" = cuda ]; then
  say "slow tests (more than 2^31 elements)"
  timeout 30 "$PY" -m pytest -q -p no:cacheprovider -m slow tests > "$OUT/tests_slow.log" 2>&1 || status=1
  tail -1 "$OUT/tests_slow.log" | tee -a "$SUMMARY"

  say "compute-sanitizer memcheck on every kernel"
  if command -v compute-sanitizer > /dev/null; then
    timeout 30 compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" benchmarks/gpu_smoke.py \
      > "$OUT/sanitizer.log" 2>&1 || status=1
    grep -E "gpu_smoke|ERROR SUMMARY|MISMATCH|Invalid" "$OUT/sanitizer.log" | head -10 | tee -a "$SUMMARY"
  else
    say "no compute-sanitizer: plain smoke run"
    timeout 30 "$PY" benchmarks/gpu_smoke.py > "$OUT/sanitizer.log" 2>&1 || status=1
    tail -3 "$OUT/sanitizer.log" | tee -a "$SUMMARY"
  fi
else
  timeout 30 "$PY" benchmarks/gpu_smoke.py --device "$SMOKE_DEVICE" > "$OUT/sanitizer.log" 2>&1 || status=1
  tail -1 "$OUT/sanitizer.log" | tee -a "$SUMMARY"
fi

say "benchmark (${BENCH_ARGS[*]})"
timeout 110 "$PY" benchmarks/bench.py "${BENCH_ARGS[@]}" --json "$OUT/bench.json" \
  > "$OUT/bench.log" 2>&1 || status=1
tail -2 "$OUT/bench.log" | tee -a "$SUMMARY"

say "done, status $status"
echo
echo "---- short table (train = fwd+bwd; ratio ext/BatchNorm; %copy: ext bandwidth on the minimum bytes / copy) ----"
"$PY" - "$OUT/bench.json" <<'PYEOF' || true
import json, sys
d = json.load(open(sys.argv[1]))
for dev, m in d["machines"].items():
    print(f"{dev}: {m.get('gpu', m['cpu'])}, torch {m['torch']}, copy {m['copy_GBps']:.0f} GB/s, {m['date']}")
print(f"{'shape':<14}{'dtype':<9}{'layout':<14}{'K':>2} {'trn x':>6} {'trn%cp':>6} {'eval x':>6} {'ref/ext':>7}")
for r in d["records"]:
    t, e = r["train"], r["eval"]
    print(f"{'x'.join(map(str, r['shape'])):<14}{r['dtype']:<9}{r['layout']:<14}{r['K']:>2} "
          f"{t['ext_over_bn']:>6.2f} {100 * t['ext_copy_fraction']:>6.0f} {e['ext_over_bn']:>6.2f} "
          f"{t.get('ref_over_ext', float('nan')):>6.1f}x")
PYEOF
cat "$SUMMARY" | grep -E "FAILED|passed|failed|gpu_smoke|ERROR SUMMARY|status" | tail -8
exit $status
