"""Records every batch a TRL GRPO trainer generates (prompt and completion ids as TRL made them), for tests that
recompute the logged numbers independently. Used in-process (tests/test_trainers.py) and under torchrun
(tests/dist_callback.py)."""

from __future__ import annotations


def batch_ids(out: dict) -> dict[str, list[list[int]]]:
    """Unpadded prompt and completion ids of one ``_generate_and_score_completions`` output."""
    return {
        "prompts": [row[m.bool()].tolist() for row, m in zip(out["prompt_ids"], out["prompt_mask"])],
        "completions": [row[m.bool()].tolist() for row, m in zip(out["completion_ids"], out["completion_mask"])],
    }


def record_batches(setattr_fn=setattr) -> list[dict]:
    """Wrap ``GRPOTrainer._generate_and_score_completions`` so each batch is appended to the returned list.
    ``setattr_fn``: ``monkeypatch.setattr`` in tests (undone after the test), plain ``setattr`` in scripts."""
    from trl import GRPOTrainer

    batches: list[dict] = []
    original = GRPOTrainer._generate_and_score_completions

    def record(self, inputs):
        out = original(self, inputs)
        batches.append(batch_ids(out))
        return out

    setattr_fn(GRPOTrainer, "_generate_and_score_completions", record)
    return batches


def keep_advantages(trainer) -> dict:
    """Wrap ``trainer``'s own ``_generate_and_score_completions`` (a subclass's, after its advantages are made) so
    the returned dict holds the last batch's ``advantages``."""
    kept: dict = {}
    inner = trainer._generate_and_score_completions

    def keep(inputs):
        out = inner(inputs)
        kept["advantages"] = out["advantages"].clone()
        return out

    trainer._generate_and_score_completions = keep
    return kept
