#!/usr/bin/env bash
# Benchmark, train and release on a GPU machine in one command, sized for a
# 15-minute slot of GPU time (the machine's start included); the work is
# prepared on the CPU machine first:
#
#   bash tools/gpu_session.sh --prepare   # on the CPU machine: wheels and data into .device/
#   # then, on the GPU machine, with .device/ copied beside the clone:
#   #   bash tools/gpu_session.sh          (give it ~560 s)
#
# What it does there, each stage under its own time limit so that one slow
# stage cannot take the others' time:
#   1. installs the carried wheels (the device image has JAX, flax, optax,
#      orbax, chex, absl; not tensorboardX), prints the device and versions;
#   2. bench: experiments.benchmark for the paper attention config at each of
#      BENCH_BATCHES (step time, images/s, compile time, FLOP/s against same-run
#      matmuls, ops per time step, device memory) and the small config at 100;
#   3. train: the paper attention config at TRAIN_BATCH for about TRAIN_SECONDS
#      of training (the step count comes from stage 2's step time, so the
#      cosine schedule ends when the time does), evaluated on all of valid;
#   4. release: tools.export_pretrained of that run into $OUT (the
#      parameters, a few MB, and the card with its valid bound).
# Results under $OUT (the folder copied back from the GPU machine): summary.txt (also
# printed last), bench_*.json, *.log, the released .npz / .json.
#
# Settings (environment): STAGES ("bench train release"), BENCH_BATCHES
# ("100 400"), TRAIN_BATCH (400), TRAIN_SECONDS (150), TRAIN_LR (5e-3),
# BENCH_CONFIG (paper_attention), SMALL_CONFIG (small_attention), TRAIN_FLAGS
# (extra flags for experiments.train), STAGE_TIMEOUT (120 s per benchmark run),
# DATA (.device/data/binarized_mnist), TRAIN_STEPS (instead of the step count
# from the benchmark, e.g. for STAGES="train release" alone in a second call),
# PREVIOUS_STEPS (0; the steps behind an --init_from model, for the card),
# RELEASE_NAME (binarized_mnist_attention_gpu).
# To continue the released model rather than start afresh (a warm restart like
# the CPU stages, its cosine ending when the time does):
#   TRAIN_FLAGS="--init_from=binarized_mnist_attention --kl_warmup_steps=0 --warmup_steps=100 \
#     --lr_schedule=cosine" TRAIN_LR=2e-3 PREVIOUS_STEPS=136000 bash tools/gpu_session.sh
# The two-digit model the same way (RELEASE_NAME names the released files):
#   TRAIN_FLAGS="--init_from=mnist_two_digits_attention --preset=paper_two_digits --adam_b1=0.9 \
#     --kl_warmup_steps=0 --warmup_steps=200 --lr_schedule=cosine" TRAIN_LR=1e-3 TRAIN_BATCH=100 \
#     PREVIOUS_STEPS=74000 DATA=.device/data/mnist RELEASE_NAME=mnist_two_digits_attention_gpu \
#     STAGES="train release" TRAIN_STEPS=... bash tools/gpu_session.sh
# A peephole model from scratch (the attention run's next question; see
# BUILD_NOTES, "What next"), its schedule as long as the time allows:
#   TRAIN_FLAGS="--peepholes" RELEASE_NAME=binarized_mnist_attention_peepholes_gpu bash tools/gpu_session.sh
# Budget: three benchmark runs of about a minute each, then about 4 minutes of
# training, evaluation and release, inside the 560 s asked for above; with the
# machine's start that is ~11 of the 15 device minutes, so a retry can only be
# one short stage (STAGES=bench, or STAGES="train release" with TRAIN_STEPS).
# On the CPU, as a check of the script:
#   OUT=/tmp/gpu_check BENCH_CONFIG=tiny SMALL_CONFIG=tiny BENCH_BATCHES=8 \
#   TRAIN_BATCH=8 TRAIN_SECONDS=20 TRAIN_FLAGS="--T=3 --enc_size=16 --dec_size=16 --z_size=4" \
#   bash tools/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    set -e
    shared=${SHARED_DATA:-../shared/data}
    mkdir -p .device/data .device/whl
    cp -r "$shared/binarized_mnist" "$shared/mnist" .device/data/
    version=$(python3 -c "import tensorboardX; print(tensorboardX.__version__)")
    python3 -m pip download -q --no-deps --only-binary=:all: -d .device/whl "tensorboardX==$version"
    du -sh .device
    echo "prepared .device/ (git-ignored): carry it with the call"
    exit 0
fi

OUT=${OUT:-$PWD/.device/out}
STAGES=${STAGES:-bench train release}
BENCH_BATCHES=${BENCH_BATCHES:-100 400}
TRAIN_BATCH=${TRAIN_BATCH:-400}
TRAIN_SECONDS=${TRAIN_SECONDS:-150}
TRAIN_LR=${TRAIN_LR:-5e-3}
BENCH_CONFIG=${BENCH_CONFIG:-paper_attention}
SMALL_CONFIG=${SMALL_CONFIG:-small_attention}
TRAIN_FLAGS=${TRAIN_FLAGS:-}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-120}
DATA=${DATA:-.device/data/binarized_mnist}
RUN=${RUN:-/tmp/draw_gpu_run}
PREVIOUS_STEPS=${PREVIOUS_STEPS:-0}
RELEASE_NAME=${RELEASE_NAME:-binarized_mnist_attention_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
summary="$OUT/summary.txt"
note() { echo "$*" | tee -a "$summary"; }

# 1. Environment.
if compgen -G ".device/whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/draw_site .device/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/draw_site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
note "== $(date -u +%FT%TZ) $(python3 -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())' 2>&1 | tail -1)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$summary"

bench() {  # bench CONFIG BATCH
    local json="$OUT/bench_$1_b$2.json"
    timeout -s TERM "$STAGE_TIMEOUT" python3 -m experiments.benchmark --configs="$1" --batch_size="$2" \
        --steps=20 --compile_sweep=false --data_pipeline=false --unrolled_T=0 --json="$json" \
        >>"$OUT/bench.log" 2>&1 || note "benchmark $1 at batch $2: failed or over ${STAGE_TIMEOUT}s (bench.log)"
}

# 2. Benchmarks.
if [[ " $STAGES " == *" bench "* ]]; then
    for b in $BENCH_BATCHES; do bench "$BENCH_CONFIG" "$b"; done
    bench "$SMALL_CONFIG" 100
    python3 - "$OUT" <<'EOF' | tee -a "$summary"
import glob, json, sys
print(f"{'config':<18}{'batch':>6}{'step ms':>9}{'img/s':>9}{'compile s':>10}{'FLOP/s':>10}{'/matmul':>8}{'/shaped':>8}{'ops/t':>6}{'dev MB':>8}")
for path in sorted(glob.glob(f"{sys.argv[1]}/bench_*.json")):
    for r in json.load(open(path)):
        if "step_ms_median" in r:
            print(f"{r['name']:<18}{r['batch_size']:>6}{r['step_ms_median']:>9.2f}{r['images_per_s']:>9.0f}"
                  f"{r['compile_s']:>10.1f}{r['achieved_flops_per_s']:>10.3g}{r['flop_fraction']:>8.3f}"
                  f"{r['shaped_fraction']:>8.3f}{r['ops_per_time_step']:>6}{r['device_peak_mb'] or 0:>8.0f}")
EOF
fi

# 3. Training, as long as TRAIN_SECONDS allows at the measured step time.
if [[ " $STAGES " == *" train "* ]]; then
    steps=${TRAIN_STEPS:-$(python3 - "$OUT/bench_${BENCH_CONFIG}_b${TRAIN_BATCH}.json" "$TRAIN_SECONDS" <<'EOF'
import json, sys
try:
    ms = next(r["step_ms_median"] for r in json.load(open(sys.argv[1])) if "step_ms_median" in r)
except (OSError, StopIteration, ValueError):
    ms = 50.0  # no benchmark of this batch: a guess
print(max(100, int(float(sys.argv[2]) * 1000 / ms) // 100 * 100))
EOF
)}
    note "train: $steps steps at batch $TRAIN_BATCH, lr $TRAIN_LR (about ${TRAIN_SECONDS}s of steps)"
    rm -rf "$RUN"
    # Evaluations: every quarter of the run, on all of valid. SIGTERM at the
    # limit ends the run with its last checkpoint (exit 143), which stage 4 releases.
    # shellcheck disable=SC2086
    timeout -s TERM $((TRAIN_SECONDS * 2 + 120)) python3 -m experiments.train --attention=true \
        --data_dir="$DATA" --workdir="$RUN" --batch_size="$TRAIN_BATCH" --learning_rate="$TRAIN_LR" \
        --num_steps="$steps" --eval_every=$((steps / 4)) --eval_examples=0 --checkpoint_every=$((steps / 4)) \
        $TRAIN_FLAGS >"$OUT/train.log" 2>&1
    note "train: exit $? ($(grep -c 'valid bound' "$OUT/train.log") evaluations)"
    grep -o 'step [0-9]*  valid bound [0-9.]* nats' "$OUT/train.log" | tee -a "$summary"
    { grep -o 'first step.*' "$OUT/train.log" | head -1; grep -o '[0-9]* img/s' "$OUT/train.log" | tail -1; } \
        | tee -a "$summary"
fi

# 4. The run as a released model (parameters and card), into $OUT.
if [[ " $STAGES " == *" release "* ]] && [ -d "$RUN" ]; then
    timeout -s TERM 180 python3 -m tools.export_pretrained --workdir="$RUN" \
        --name="$RELEASE_NAME" --output_dir="$OUT" --data_dir="$DATA" \
        --previous_steps="$PREVIOUS_STEPS" \
        --note="machine=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo cpu)" \
        --note="command=TRAIN_BATCH=$TRAIN_BATCH TRAIN_SECONDS=$TRAIN_SECONDS TRAIN_LR=$TRAIN_LR TRAIN_FLAGS='$TRAIN_FLAGS' bash tools/gpu_session.sh" \
        >"$OUT/release.log" 2>&1
    note "release: exit $? $(ls "$OUT" | grep -c "$RELEASE_NAME") files"
    grep -i 'valid' "$OUT/release.log" | tail -2 | tee -a "$summary"
fi
note "== $(date -u +%FT%TZ) done"
