"""Run by tests/test_trainers.py under torchrun (2 CPU processes, gloo): RPECallback on a tiny GRPO run.

Each rank writes the batches it generated (prompt and completion ids) so the test can recompute the gathered
metrics independently; the learning rate is 0 so both steps read the same model."""

import json
import sys

import torch
from trl import GRPOConfig, GRPOTrainer

from grpo_batches import record_batches
from rpe.bundle import random_bundle
from rpe.tiny import tiny_model
from rpe.prompts import PromptBuilder, PromptConfig
from rpe.tasks import load_task
from rpe.trainers import RPECallback
from rpe.trainers.recipes import build_dataset

out = sys.argv[1]
model, tok = tiny_model()
task = load_task("chain_sum_2")
ds, problems = build_dataset(task, PromptBuilder(task, tok, PromptConfig(shots=1)), 8, 0, chat=True)
args = GRPOConfig(output_dir=out, max_steps=2, per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                  report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, seed=0, learning_rate=0.0)
batches = record_batches()


def parity(completion_ids, **kwargs):  # varies within the batch (the old len(c) % 2 was constant at 8 tokens)
    return [float(sum(c) % 2) for c in completion_ids]


cb = RPECallback(random_bundle(model, tok))
trainer = GRPOTrainer(model=model, processing_class=tok, args=args, train_dataset=ds, callbacks=[cb],
                      reward_funcs=[parity])
trainer.train()
rank = trainer.accelerator.process_index
with open(f"{out}/batches_rank{rank}.json", "w") as f:
    json.dump(batches, f)
if trainer.accelerator.is_main_process:
    with open(f"{out}/log_history.json", "w") as f:
        json.dump(trainer.state.log_history, f)
print(f"RANK {rank} local rows per step: {len(cb.history)}", flush=True)
# tear the process group down before the interpreter exits: a rank left with gloo's threads running aborted at
# exit now and then ("terminate called without an active exception", exit -6) after a complete run
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
