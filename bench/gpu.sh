#!/usr/bin/env bash
# Every measurement of issue 12 on one GPU in <= 8 minutes: results as JSON lines + a short summary.
#
#   bash bench/gpu.sh OUTDIR                         # the GPU run (bf16; sum of the timeouts below: 470 s)
#   bash bench/gpu.sh --smoke OUTDIR                 # tiny shapes on whatever device there is (CPU: seconds each)
#   bash bench/gpu.sh --only=grpo_e2e_1.5b OUTDIR    # only these (comma-separated; setup always runs; OUTDIR is
#                                                    # rewritten, so give a re-run its own)
#
# Writes OUTDIR/results.jsonl (one line per measurement, then a "summary" line), OUTDIR/summary.txt,
# OUTDIR/logs/NAME.log and OUTDIR/grpo_e2e_1.5b.metrics.jsonl. Checkpoints (random weights, ~4 GB for the two
# shapes) go to $GPU_BENCH_WORK (default ${TMPDIR:-/tmp}/nanor1_gpu_bench) and are reused by a later run there.
# Each measurement is its own process under `timeout`: a crash, OOM or timeout is recorded as a failed line
# with its log tail, and the rest still runs. Needs only torch and transformers; downloads nothing.
# Exit status: 0 when every measurement is ok, 1 otherwise.
set -u
cd "$(dirname "$0")/.."

SMOKE=""
ONLY=""
OUT=""
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE="--smoke" ;;
    --only=*) ONLY="${arg#--only=}" ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *) OUT="$arg" ;;
  esac
done
if [ -z "$OUT" ]; then
  echo "usage: bash bench/gpu.sh [--smoke] [--only=NAME,...] OUTDIR" >&2
  exit 2
fi
PY="${PYTHON:-$(command -v python || command -v python3)}"
WORK="${GPU_BENCH_WORK:-${TMPDIR:-/tmp}/nanor1_gpu_bench}"
mkdir -p "$OUT/logs" "$OUT/parts" "$WORK"
rm -f "$OUT/results.jsonl" "$OUT"/parts/*.json "$OUT"/*.metrics.jsonl  # OUTDIR holds this run only
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TRANSFORMERS_NO_ADVISORY_WARNINGS=1
if [ -n "$SMOKE" ]; then
  # tiny shapes on a shared CPU: one thread (OpenMP barriers on contended cores make 2 threads far slower)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

# name, timeout (s), subcommand and its arguments. The timeouts are ~2-3x the expected H200 times.
MEASUREMENTS=(
  "setup 40 setup"
  "decode_b1_0.5b 25 decode --model=0.5b"
  "decode_b1_1.5b 25 decode --model=1.5b"
  "rollout_ours_b64_1.5b 30 rollout --impl=ours --batch=64 --model=1.5b"
  "rollout_ours_b256_1.5b 45 rollout --impl=ours --batch=256 --model=1.5b"
  "rollout_hf_b64_1.5b 45 rollout --impl=hf --batch=64 --model=1.5b"
  "rollout_hf_b256_1.5b 50 rollout --impl=hf --batch=256 --model=1.5b"
  "sft_0.5b 25 sft --model=0.5b"
  "sft_1.5b 30 sft --model=1.5b"
  "grpo_update_0.5b 25 grpo_update --model=0.5b"
  "grpo_update_1.5b 30 grpo_update --model=1.5b"
  "grpo_e2e_1.5b 100 grpo_e2e --model=1.5b"
)

selected() {  # setup always runs: the others need its checkpoints
  [ -z "$ONLY" ] || [ "$1" = setup ] || [[ ",$ONLY," == *",$1,"* ]]
}

names=" "
for m in "${MEASUREMENTS[@]}"; do names+="${m%% *} "; done
for n in ${ONLY//,/ }; do
  if [[ "$names" != *" $n "* ]]; then
    echo "--only: no measurement named $n (names:$names)" >&2
    exit 2
  fi
done

budget=0
for m in "${MEASUREMENTS[@]}"; do
  set -- $m
  if selected "$1"; then budget=$((budget + $2)); fi
done
if [ "$budget" -gt 480 ]; then
  echo "the selected timeouts add up to $budget s > 480 s" >&2
  exit 2
fi
echo "nanoR1 GPU bench${SMOKE:+ (smoke)}: out $OUT, work $WORK, worst case $budget s"

for m in "${MEASUREMENTS[@]}"; do
  set -- $m
  name=$1
  limit=$2
  shift 2
  selected "$name" || continue
  log="$OUT/logs/$name.log"
  start=$(date +%s.%N)
  timeout -k 5 "$limit" "$PY" bench/gpu.py "$@" --name="$name" --out="$OUT" --work="$WORK" $SMOKE >"$log" 2>&1
  rc=$?
  elapsed=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
  "$PY" bench/gpu.py record --name="$name" --rc="$rc" --elapsed="$elapsed" --timeout="$limit" --log="$log" \
    --out="$OUT" $SMOKE
done
"$PY" bench/gpu.py summary --out="$OUT" $SMOKE
