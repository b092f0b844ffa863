#!/usr/bin/env bash
# The second cpu-quality round, as it was run (one thread per job, two to four jobs at a time on 2 cores):
# every model on cpu-quality's experiment in fp32 (experiment.toml), every cell 256 samples with seed 0 scored by
# `klflow eval` against the 256 held-out windows of the first round (the same data row), MAUVE over 5 k-means seeds.
set -euo pipefail
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
here=$(dirname "$0"); cfg=$here/experiment.toml
klflow train --config "$cfg" --out runs/alpha                                       # klflow's defaults (alpha time)
klflow train --config "$cfg" --method ar --out runs/ar                              # the baseline and the teacher
klflow train --config "$cfg" --set model.self_conditioning=true --out runs/alpha-sc
klflow distill runs/ar --out data/ar-t08 -n 16384 --temperature 0.8 --seed 1        # 16,384 x 128 teacher tokens
klflow train --config "$cfg" --data data/ar-t08 --out runs/student                  # the distilled student
klflow train --config "$cfg" --data data/ar-t08 --set model.self_conditioning=true --out runs/student-sc

cell() {  # NAME RUN STEPS [sample options]: 256 samples, then their scores
    local name=$1 run=$2 steps=$3; shift 3
    klflow sample "$run" --steps "$steps" -n 256 --seed 0 --out "cells/$name.jsonl" "$@"
    klflow eval "cells/$name.jsonl" --out "cells/$name.eval.json"
}
cell alpha-nfe64 runs/alpha 63
cell alpha-sc-recompute-nfe64 runs/alpha-sc 31                      # two calls per step: NFE 64
cell ar-t1 runs/ar 64 --temperature 1.0
cell ar-t08 runs/ar 64 --temperature 0.8
cell student-nfe16 runs/student 15
cell student-nfe64 runs/student 63
cell student-nfe128 runs/student 127
cell student-t09-nfe16 runs/student 15 --temperature 0.9
cell student-t09-nfe64 runs/student 63 --temperature 0.9
cell student-t1-nfe64 runs/student 63 --temperature 1.0
cell student-sc-nfe64 runs/student-sc 31

python "$here/../../eval_table.py" --plot "$here/gen_ppl_vs_entropy.png" \
    "klflow (alpha time), NFE 64=cells/alpha-nfe64.eval.json" \
    "self-conditioned, recompute, NFE 64=cells/alpha-sc-recompute-nfe64.eval.json" \
    "distilled, NFE 16=cells/student-nfe16.eval.json" \
    "distilled, NFE 64=cells/student-nfe64.eval.json" \
    "distilled, NFE 128=cells/student-nfe128.eval.json" \
    "distilled T 0.9, NFE 16=cells/student-t09-nfe16.eval.json" \
    "distilled T 0.9, NFE 64=cells/student-t09-nfe64.eval.json" \
    "distilled T 1, NFE 64=cells/student-t1-nfe64.eval.json" \
    "distilled + self-cond., NFE 64=cells/student-sc-nfe64.eval.json" \
    "ar T 1=cells/ar-t1.eval.json" \
    "ar T 0.8=cells/ar-t08.eval.json"
