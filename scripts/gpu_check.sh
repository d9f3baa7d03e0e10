#!/usr/bin/env bash
# The GPU check of allocsearch, one prepared script for one GPU, at most ~8 minutes, printing one table:
#   1  the tests that touch CUDA, devices, bf16/fp16 or GPU packing (those that need CUDA skip without it)
#   2  a real search with four trials packed on the GPU:
#        allocsearch start --budget 0.1gpu-h --gpus-per-trial 0.25 --model smollm2-135m --space decoder
#      stopped with SIGINT at its time limit (the running trials are recorded); trials by state and
#      spend / budget from `allocsearch status --json`
#   3  trials per GPU-hour and peak memory per trial (results.json peak_memory_mb) at --gpus-per-trial 1
#      and 0.5 (short budgets) and 0.25 (the search of 2)
# Without a GPU it runs the CPU part of 1, says so in one line, and exits with the tests' status (0 when
# they pass). Every command runs under `timeout`; the steps share one deadline (GPU_CHECK_SECONDS, 420).
#
#   bash scripts/gpu_check.sh            # studies in a temp folder, removed at the end
#   KEEP=1 bash scripts/gpu_check.sh     # keep them (the path is printed)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
DEADLINE=${GPU_CHECK_SECONDS:-420}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
ROWS=()
STATUS=0

row() { ROWS+=("$1"$'\t'"$2"$'\t'"$3"); }
left() { echo $((DEADLINE - SECONDS)); }
# the smaller of a step's own limit and what the deadline leaves after `reserve` seconds for later steps
limit() { local own=$1 reserve=$2 rest; rest=$(( $(left) - reserve )); [ "$rest" -lt "$own" ] && own=$rest; [ "$own" -lt 1 ] && own=1; echo "$own"; }

table() {
  printf '\n%-34s | %-7s | %s\n' "check" "result" "detail"
  printf '%s\n' "-----------------------------------+---------+------------------------------------------------"
  local r
  for r in "${ROWS[@]}"; do
    IFS=$'\t' read -r a b c <<<"$r"
    printf '%-34s | %-7s | %s\n' "$a" "$b" "$c"
  done
  printf '\n%s s in all; exit %s\n' "$SECONDS" "$STATUS"
}

# one study's line: trials by state, spend / budget, trials per GPU-hour, peak memory per trial
# (args: workdir study) -> "RESULT<TAB>DETAIL"
study_line() {
  timeout 60 "$PY" - "$1" "$2" <<'EOF'
import json, statistics, subprocess, sys
from pathlib import Path
workdir, study = sys.argv[1], sys.argv[2]
out = subprocess.run([sys.executable, "-m", "allocsearch", "status", "--workdir", workdir, "--study", study, "--json"],
                     capture_output=True, text=True, timeout=50)
try:
    s = json.loads(out.stdout)
except ValueError:
    print(f"FAIL\tstatus --json gave no JSON (exit {out.returncode}): {(out.stderr.strip().splitlines() or [''])[-1][:100]}")
    sys.exit()
c, b = s["counts"], s["budget"]
ended = c["completed"] + c["pruned"]
hours = b["spent"] / 3600 if b["unit"] == "gpu" else None
peaks = []
for p in sorted((Path(s["root"]) / "trials").glob("*/results.json")):
    try:
        r = json.loads(p.read_text())
    except ValueError:
        continue
    if r.get("peak_memory_mb") is not None:
        peaks.append((r["peak_memory_mb"], r.get("memory_kind") or "?"))
# a trial SIGINT stopped before its first checkpoint is failed "stopped by the user": not a failure here
user = sum(t["state"] == "failed" and str(t["reason"] or "").startswith("stopped by the user") for t in s["trials"])
bad = c["failed"] - user + c["crashed"] + c["running"]
result = "FAIL" if bad or not ended else "ok"
rate = f"{ended / hours:.0f} trials/GPU-h" if hours else "no GPU spend"
mem = (f"peak MiB/trial median {statistics.median(m for m, _ in peaks):.0f}, max {max(m for m, _ in peaks):.0f} "
       f"({peaks[0][1]})") if peaks else "no peak_memory_mb in results.json"
print(f"{result}\t{c['completed']} completed, {c['pruned']} pruned, {c['oom']} oom, {c['failed'] - user} failed, "
      f"{user} stopped before a checkpoint, "
      f"{c['crashed']} crashed, {c['running']} running; spend {b['spent'] / 3600:.3f}/{b['total'] / 3600:.3f} "
      f"{b['unit'].upper()}-h; {rate}; {mem}")
EOF
}

# a search under a time limit: SIGINT at the limit (trials recorded), SIGKILL 20 s later
# (args: label seconds study gpus budget extra...) -> a table row
search() {
  local label=$1 secs=$2 study=$3 gpus=$4 budget=$5; shift 5
  if [ "$secs" -lt 60 ]; then row "$label" "skipped" "out of time (${secs} s left for it)"; return; fi
  local t0=$SECONDS rc line reason
  timeout --preserve-status -s INT -k 20 "$secs" "$PY" -m allocsearch start --workdir "$WORK" --study "$study" \
    --budget "$budget" --gpus-per-trial "$gpus" --model smollm2-135m --space decoder --json "$@" \
    >"$WORK/$study.out" 2>"$WORK/$study.err"
  rc=$?
  reason=$(grep -o 'SIGINT: stopping' "$WORK/$study.err" >/dev/null && echo "stopped by SIGINT at ${secs} s" || echo "ran to its end")
  line=$(study_line "$WORK" "$study") || line=$'FAIL\tstatus summary timed out'
  if [ "$rc" -ne 0 ]; then
    line="FAIL"$'\t'"exit $rc ($(tail -1 "$WORK/$study.err" | cut -c1-90)); ${line#*$'\t'}"
  fi
  [ "${line%%$'\t'*}" = ok ] || STATUS=1
  row "$label" "${line%%$'\t'*}" "${line#*$'\t'}; $reason after $((SECONDS - t0)) s"
}

# ------------------------------------------------------------------------------------------ 1 tests
GPU=$(timeout 60 "$PY" -c "import torch; print(torch.cuda.is_available())" 2>/dev/null || echo "unknown")
TESTS=(tests/test_device.py tests/test_models.py tests/test_train.py tests/test_search_executor.py tests/test_bench.py)
timeout -k 10 "$(limit 150 0)" "$PY" -m pytest -q -rs -p no:cacheprovider "${TESTS[@]}" \
  -k "cuda or device or bf16 or fp16 or gpu" >"$WORK/tests.txt" 2>&1
rc=$?
summary=$(grep -E '(passed|failed|error|skipped)' "$WORK/tests.txt" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
skips=$(grep '^SKIPPED' "$WORK/tests.txt" | sed -E 's/^SKIPPED \[[0-9]+\] //; s/: /: /' | cut -c1-70 | paste -sd';' -)
if [ "$rc" -eq 0 ]; then result=ok; else result=FAIL; STATUS=1; fi
row "1 CUDA/device/bf16 tests" "$result" "${summary:-no summary (exit $rc)}${skips:+; skipped: $skips}"

if [ "$GPU" != "True" ]; then
  echo "no GPU here (torch.cuda.is_available(): $GPU): ran the CPU part of the tests; the GPU searches (2, 3) need one"
  row "2 search 0.1gpu-h @0.25 GPU" "skipped" "no GPU"
  row "3 trials/GPU-h, peak memory" "skipped" "no GPU"
  table
  exit "$STATUS"
fi
DEVICE=$(timeout 60 "$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB')" 2>/dev/null)
echo "GPU: ${DEVICE:-?}; deadline ${DEADLINE} s"
# load the model once (the first load converts the wheel's GGUF into the cache, which the trials then read)
if ! timeout 150 "$PY" -c "from allocsearch.training.models import load_model; load_model('smollm2-135m', device='cpu')" \
    >"$WORK/model.txt" 2>&1; then
  row "2 search 0.1gpu-h @0.25 GPU" "FAIL" "smollm2-135m not loadable: $(tail -1 "$WORK/model.txt" | cut -c1-90)"
  STATUS=1
  table
  exit "$STATUS"
fi

# ------------------------------------------------------------------------------------------ 2 + 3 searches
# 2 gets what the deadline leaves after two short searches (~110 s each with Ray's start); 0.1gpu-h of four
# packed trials would take ~6 min, so it is normally stopped by SIGINT and reported as far as it got
search "2 search 0.1gpu-h @0.25 GPU" "$(limit 200 230)" gpu025 0.25 0.1gpu-h
search "3 @1 GPU per trial (0.015gpu-h)" "$(limit 100 115)" gpu100 1 0.015gpu-h --no-mlflow
search "3 @0.5 GPU per trial (0.015gpu-h)" "$(limit 100 5)" gpu050 0.5 0.015gpu-h --no-mlflow
row "3 @0.25 GPU per trial" "-" "the search of 2 (gpu025)"
table
exit "$STATUS"
