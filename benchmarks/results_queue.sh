#!/usr/bin/env bash
# Regenerates the README's results after benchmarks/discovery.py (SmolLM2, runs/results) exists, one job at a
# time (two torch jobs on 2 cores slow each other ~10x). Each step is resumable; logs go to runs/logs/.
set -u
cd "$(dirname "$0")/.."
RPE=.venv/bin/rpe
PY=.venv/bin/python
mkdir -p runs/logs
step() { echo "== $(date +%T) $1"; }

step "Gemma-3-270M discovery (count_bits)"
$PY benchmarks/discovery.py --model gemma3-270m --task count_bits --n 100 --samples 2 --shots 4 --max-new-tokens 64 \
    --layer-stride 2 --continuations 4 --dopamine-trajectories 40 --out runs/results_gemma > runs/logs/gemma.log 2>&1

step "ablation at the bundle layer, 200 held-out problems per arm, every control, and the causal RPE check"
$RPE ablate --bundle runs/results/bundle --rollouts runs/results/rollouts --out runs/results/ablation --n-problems 200 \
    --controls value,random,random_matched,top_magnitude,wanda,next_token,mc_probe --seeds 2 --causal \
    > runs/logs/ablation.log 2>&1

step "offline analysis report"
ABL=""; [ -f runs/results/ablation/results.json ] && ABL="--ablation runs/results/ablation"
$RPE analyze --rollouts runs/results/rollouts --bundle runs/results/bundle --out runs/results/analysis $ABL \
    > runs/logs/analyze.log 2>&1
chromium --headless --no-sandbox --disable-gpu --window-size=1000,1800 --screenshot=docs/analyze.png \
    "file://$(pwd)/runs/results/analysis/report.html" > /dev/null 2>&1

step "benchmarks"
$RPE bench ablate --quick > runs/logs/bench_ablate.log 2>&1
$RPE bench train --quick --bundle runs/results/bundle > runs/logs/bench_train.log 2>&1

step "training: GRPO + internal RPE arm (after the trailing-EOS fix)"
$PY benchmarks/train_curves.py --bundle runs/results/bundle --out runs/train --arms grpo_rpe_reward > runs/logs/train_rpe_arm.log 2>&1

step "memory benchmark"
$RPE bench memory --quick > runs/logs/bench_memory.log 2>&1

step "transfer heatmap (IoU across tasks and layers)"
$PY benchmarks/transfer_heatmap.py --out runs/results > runs/logs/transfer_heatmap.log 2>&1

step "ablation layer sweep (64 problems per arm)"
$RPE ablate --bundle runs/results/bundle --rollouts runs/results/rollouts --out runs/results/ablation_sweep --n-problems 64 \
    --layers 12,20,28 --controls value,random --seeds 2 > runs/logs/ablation_sweep.log 2>&1

step "step-level search, 200 problems"
$RPE search --bundle runs/results/bundle --n-problems 200 --methods greedy,value,majority,logprob,random --max-step-tokens 32 \
    --out runs/results/search.json > runs/logs/search.log 2>&1

step "held-out rollouts (seed 2, 2 samples) and their analysis: confidence before answering"
$RPE rollouts --task chain_sum --n-problems 200 --samples 2 --seed 2 --out runs/results/rollouts_heldout > runs/logs/rollouts_heldout.log 2>&1
$RPE analyze --rollouts runs/results/rollouts_heldout --bundle runs/results/bundle --out runs/results/analysis_heldout \
    > runs/logs/analyze_heldout.log 2>&1
step "done"
