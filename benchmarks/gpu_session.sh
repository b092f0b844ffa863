#!/usr/bin/env bash
# One prepared GPU check for a lent H100/H200 (about 10 minutes): the training-step benchmark of the
# 150M preset at L = 1024 (bf16 autocast, torch.compile, path fused vs eager), then a short compiled
# bf16 training run of that preset on chit-chat (GPT-2 tokenizer) and a few samples.
# Offline machines: see gpu_env.sh; logs go to $OUT.
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
timeout 300 python3 benchmarks/train_step.py --preset gpt2-small-150m --batch 16 --dtypes bf16 --compile \
    --repeats 10 2>&1 | tee "$OUT/bench.txt"
timeout 300 python3 -m klflow train --config gpt2-small-150m --data chitchat --out /tmp/run --minutes 2 \
    --set train.compile=true --set train.batch_size=64 --set train.micro_batch_size=32 \
    --set train.warmup_steps=50 --set train.eval_interval=100 --set train.eval_windows=64 \
    --set train.checkpoint_interval=100000 2>&1 | tee "$OUT/train.txt"
timeout 90 python3 -m klflow sample /tmp/run --sampler hybrid --steps 128 -n 4 --seq-len 128 --seed 0 \
    2>&1 | tee "$OUT/sample.txt"
