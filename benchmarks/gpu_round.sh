#!/usr/bin/env bash
# Many short training runs at once on one GPU, for screening (issue 28), after a short
# speed check of the training step (issue 31). One lease of a GPU machine, about 9.5 minutes:
#
#     OUT=/tmp/gpu_round bash benchmarks/gpu_round.sh
#
# 1. bench_train.py at batch 256, 84x84, float32 and bf16 (the GPU otherwise idle; ROUND=screen);
# 2. the round's RUNS (below) all at once, each a main_multimodal.py run on its own data and flags,
#    until DEADLINE seconds after the start; then every run still going is stopped. What a
#    run evaluated by then is in its progress.csv. All progress.csv files and the runs' logs
#    come back in $OUT/runs.tar.gz.
# Under CUDA MPS when it starts (the runs' small kernels can then share the GPU), else plain.
# Rounds: ROUND=screen (2026-12-04, fifth session: BC on the expert alone with regularisers,
# LAPO towards 9000 steps); ROUND=oracle (LAPO with benchmarks/oracle_filter.py's filter;
# that session's oracle figures with --detached_critic came from this script at ebf0042).
# Set DEVICE=cpu SCALE=0.01 to try the script on a machine without a GPU.
set -u
OUT=${OUT:-results/gpu_round}
DEVICE=${DEVICE:-cuda}
SCALE=${SCALE:-1}          # multiplies every run's steps (to try the script quickly)
ROUND=${ROUND:-screen}
DEADLINE=${DEADLINE:-560}  # seconds from the start after which the runs are stopped
WORK=${WORK:-/tmp/gpu_round}
mkdir -p "$OUT" "$WORK/data" "$WORK/runs"
export PYTHONUNBUFFERED=1
T0=$SECONDS
steps() { python3 -c "print(max(20, int($1 * $SCALE)))"; }

if [ "$DEVICE" = cuda ]; then
    nvidia-smi -L
    python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
fi

# ---- data (the same files as the CPU screens: same variant, size and seed)
python3 create_dataset.py --create_sample --variant reach_wrong40 --mix expert=1.0 --n_samples 1600 \
    --image_size 32 --seed 11 --output "$WORK/data/expert_only.hdf5" >"$OUT/create.log" 2>&1 &
python3 create_dataset.py --create_sample --variant reach_wrong40 --n_samples 8000 --image_size 32 \
    --seed 11 --output "$WORK/data/reach_wrong40.hdf5" >>"$OUT/create.log" 2>&1 &
wait
grep -h "Wrote" "$OUT/create.log"

# ---- 1. the training step against the floor (issue 31)
if [ "$DEVICE" = cuda ] && [ "$ROUND" = screen ]; then
    for amp in off bf16; do
        echo "=== bench_train batch 256 amp $amp"
        timeout 70 python3 benchmarks/bench_train.py --device cuda --batch_size 256 --amp "$amp" --steps 10 \
            --n_rows 3000 >"$OUT/bench_b256_$amp.log" 2>&1
        grep -v "^  pair" "$OUT/bench_b256_$amp.log" | tail -n 9
    done
fi

# ---- 2. the runs: name, data, then main_multimodal.py flags (a name starting "oracle" runs
# through benchmarks/oracle_filter.py, keeping the expert's episodes)
[ "$ROUND" = screen ] && RUNS=(
  "bc_expert_s0|expert_only|--algo bc --seed 0 --max_timesteps $(steps 3000) --eval_freq $(steps 250)"
  "bc_expert_s1|expert_only|--algo bc --seed 1 --max_timesteps $(steps 3000) --eval_freq $(steps 250)"
  "bc_expert_s2|expert_only|--algo bc --seed 2 --max_timesteps $(steps 3000) --eval_freq $(steps 250)"
  "bc_expert_enclr1e-4_s0|expert_only|--algo bc --seed 0 --max_timesteps $(steps 3000) --eval_freq $(steps 250) --encoder_lr 1e-4"
  "bc_expert_small_s0|expert_only|--algo bc --seed 0 --max_timesteps $(steps 3000) --eval_freq $(steps 250) --image_feature_dim 16 --obs_feature_dim 32"
  "bc_expert_shift1_s0|expert_only|--algo bc --seed 0 --max_timesteps $(steps 3000) --eval_freq $(steps 250) --image_shift 1"
  "bc_expert_headlr5e-5_s0|expert_only|--algo bc --seed 0 --max_timesteps $(steps 3000) --eval_freq $(steps 250) --vae_lr 5e-5"
  "bc_expert_encdecay1_s0|expert_only|--algo bc --seed 0 --max_timesteps $(steps 3000) --eval_freq $(steps 250) --encoder_lr_decay 1.0"
  "bc_expert_b256_s0|expert_only|--algo bc --seed 0 --max_timesteps $(steps 3000) --eval_freq $(steps 250) --batch_size 256"
  "lapo_base9k_s0|reach_wrong40|--seed 0 --max_timesteps $(steps 9000) --eval_freq $(steps 500)"
  "lapo_base9k_s1|reach_wrong40|--seed 1 --max_timesteps $(steps 9000) --eval_freq $(steps 500)"
  "lapo_foldfdrop9k_s0|reach_wrong40|--seed 0 --max_timesteps $(steps 9000) --eval_freq $(steps 500) --value_folds 2 --feature_dropout 0.2"
  "lapo_foldfdrop9k_s1|reach_wrong40|--seed 1 --max_timesteps $(steps 9000) --eval_freq $(steps 500) --value_folds 2 --feature_dropout 0.2"
)
[ "$ROUND" = oracle ] && RUNS=(
  "oracle_s0|reach_wrong40|--seed 0 --max_timesteps $(steps 3000) --eval_freq $(steps 500) --eval_episodes 20"
  "oracle_s1|reach_wrong40|--seed 1 --max_timesteps $(steps 3000) --eval_freq $(steps 500) --eval_episodes 20"
  "oracle_s2|reach_wrong40|--seed 2 --max_timesteps $(steps 3000) --eval_freq $(steps 500) --eval_episodes 20"
)

MPS=0
if [ "$DEVICE" = cuda ] && command -v nvidia-cuda-mps-control >/dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d && timeout 40 python3 -c "import torch; torch.ones(1, device='cuda').sum().item()"; then
        MPS=1
    else
        echo quit | nvidia-cuda-mps-control 2>/dev/null
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    fi
fi
echo "=== ${#RUNS[@]} runs at once on $DEVICE (MPS: $MPS), stopped $DEADLINE s after the start"

pids=()
for spec in "${RUNS[@]}"; do
    IFS='|' read -r name data flags <<<"$spec"
    program=(main_multimodal.py)
    [[ $name == oracle* ]] && program=(benchmarks/oracle_filter.py --keep expert --)
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=1 python3 "${program[@]}" --hdf5_path "$WORK/data/$data.hdf5" --device "$DEVICE" \
        --ExpID "$name" --log_dir "$WORK/runs" --save_freq 100000 --keep_last 1 --eval_episodes 50 $flags \
        >"$WORK/runs/$name.log" 2>&1 &
    pids+=($!)
done
while [ $((SECONDS - T0)) -lt "$DEADLINE" ]; do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=$((alive + 1)); done
    [ "$alive" -eq 0 ] && break
    [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    echo "  $((SECONDS - T0)) s: $alive runs going"
    (cd "$WORK/runs" && tar czf "$OUT/runs.tar.gz" --exclude='*.pth' --exclude='*.log' .)   # back even if cut short
    sleep 30
done
for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null; done
wait 2>/dev/null
[ "$MPS" = 1 ] && echo quit | nvidia-cuda-mps-control

for spec in "${RUNS[@]}"; do
    IFS='|' read -r name _ _ <<<"$spec"
    csv=$(ls "$WORK/runs/Exp$name"/*/progress.csv "$WORK/runs/Exp$name"/progress.csv 2>/dev/null | head -1)
    echo "$name: $( [ -n "$csv" ] && python3 -c "
import csv, sys
rows = list(csv.DictReader(open('$csv')))
print(' '.join(f\"{r['steps']}:{float(r['NormalizedScore']):.2f}\" for r in rows if r.get('NormalizedScore')))")"
done
(cd "$WORK/runs" && tar czf "$OUT/runs.tar.gz" --exclude='*.pth' .)
echo "done after $((SECONDS - T0)) s"
