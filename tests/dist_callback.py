"""Run by tests/test_trainers.py under torchrun (2 CPU processes, gloo): RPECallback on a tiny GRPO run."""

import json
import sys

from trl import GRPOConfig, GRPOTrainer

from rpe.bundle import random_bundle
from rpe.models import tiny_model
from rpe.prompts import PromptBuilder, PromptConfig
from rpe.tasks import load_task
from rpe.trainers import RPECallback
from rpe.trainers.recipes import build_dataset

out = sys.argv[1]
model, tok = tiny_model()
task = load_task("chain_sum_2")
ds, problems = build_dataset(task, PromptBuilder(task, tok, PromptConfig(shots=1)), 8, 0, chat=True)
args = GRPOConfig(output_dir=out, max_steps=2, per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                  report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, seed=0)
cb = RPECallback(random_bundle(model, tok))
trainer = GRPOTrainer(model=model, processing_class=tok, args=args, train_dataset=ds, callbacks=[cb],
                      reward_funcs=[lambda completions, **k: [float(len(c) % 2) for c in completions]])
trainer.train()
if trainer.accelerator.is_main_process:
    with open(f"{out}/log_history.json", "w") as f:
        json.dump(trainer.state.log_history, f)
print(f"RANK {trainer.accelerator.process_index} local rows per step: {len(cb.history)}", flush=True)
