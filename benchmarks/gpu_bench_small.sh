#!/usr/bin/env bash
# The gpu-tinystories bench preset scaled down to a few minutes of one GPU, as a pipeline check with
# real timings: chit-chat (GPT-2 tokenizer) stands in for TinyStories, 60 optimizer steps of 64 x 512
# tokens per model, NFE 32/64, 32 samples per cell, and an in-domain AR judge trained for 45 s first
# (SmolLM2's 93 MB package is not at hand on an offline GPU machine). The 12 x 768 backbone, bf16,
# Muon and every bench stage are the preset's own. Offline machines: see gpu_env.sh; results go to $OUT.
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 120 python3 -m klflow train --method ar --config gpt2-small-150m --data chitchat --out /tmp/judge \
    --minutes 0.75 --no-progress --set train.seq_len=512 --set train.batch_size=64 --set train.micro_batch_size=32 \
    --set train.warmup_steps=20 --set train.eval_interval=100000 --set train.eval_windows=32 2>&1 | tail -2
timeout 330 python3 -m klflow bench gpu-tinystories --data chitchat --out /tmp/bench --no-progress \
    --set train.max_steps=60 --set train.batch_size=64 --set train.micro_batch_size=32 --set train.warmup_steps=10 \
    --set train.eval_interval=30 --set train.eval_windows=32 --set train.warmdown_fraction=0.2 \
    --set "bench.nfe=[32,64]" --set bench.num_samples=32 --set bench.sample_batch_size=32 \
    --set t_star.nfe=32 --set "t_star.fractions=[0.5]" --set "beta.betas=[0.03]" --set beta.nfe=32 \
    --set frontier.nfe=32 --set 'frontier.settings=["ar:temperature=0.7","klflow:sampler=randomized,select=sample"]' \
    --set evaluation.evaluator=/tmp/judge --set evaluation.batch_size=32 --set performance.repeats=5 2>&1 | tail -25
mkdir -p "$OUT/plots"
cp /tmp/bench/RESULTS.md /tmp/bench/results.json /tmp/bench/performance.json "$OUT/" 2>/dev/null
cp /tmp/bench/plots/*.png "$OUT/plots/" 2>/dev/null
ls -R "$OUT"
