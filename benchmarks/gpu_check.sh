#!/usr/bin/env bash
# The GPU figures of the scale-out work, in one go on a CUDA machine (about 8 minutes):
#
#     OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
#
# 1. bench_train.py at batch 64 and 256, float32 and bf16 (eager), then compiled;
# 2. bench_data.py on the GPU: memory mode against stream mode (shuffle buffer on the GPU,
#    filled from pinned memory on a side stream), sampler and training step at batch 256;
# 3. main_multimodal.py end to end on CUDA in stream mode, and a 2-process torchrun run
#    (one GPU per process over nccl when there are two, else both on one GPU over gloo).
# Each part has its own time limit, so a slow part cannot take the others with it. Logs go
# to $OUT (default ./results/gpu_check).
set -u
OUT=${OUT:-results/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
part() {   # part NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, print the tail
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    grep -v "^  pair" "$OUT/$name.log" | tail -n 12
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}

nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

for batch in 64 256; do
    for amp in off bf16; do
        part "train_b${batch}_${amp}" 90 python3 benchmarks/bench_train.py --device cuda --batch_size "$batch" \
            --amp "$amp" --steps 20
    done
done
part data_cuda 120 python3 benchmarks/bench_data.py --device cuda --rows 20000 --small_rows 3000 --seconds 5 \
    --train_steps 5 --batch_size 256 --memory_batches 0 --dir /tmp/bench_data

python3 create_dataset.py --create_sample --n_samples 3000 --image_size 84 --output /tmp/sample84.hdf5 \
    >"$OUT/create.log" 2>&1 || tail "$OUT/create.log"
part run_stream 120 python3 main_multimodal.py --hdf5_path /tmp/sample84.hdf5 --device cuda --data_mode stream \
    --batch_size 256 --max_timesteps 400 --eval_freq 400 --eval_episodes 2 --ExpID gpu_stream --log_dir /tmp/runs
part torchrun2 120 torchrun --standalone --nproc_per_node=2 main_multimodal.py --hdf5_path /tmp/sample84.hdf5 \
    --device cuda --batch_size 128 --max_timesteps 200 --eval_freq 200 --eval_episodes 2 --ExpID gpu_ddp \
    --log_dir /tmp/runs
ls /tmp/runs/*/* 2>/dev/null | head -20

for amp in off bf16; do
    part "train_b256_${amp}_compiled" 120 python3 benchmarks/bench_train.py --device cuda --batch_size 256 \
        --amp "$amp" --steps 20 --compile
done
