"""Memory of capture during generation: bytes kept per trajectory and peak RSS, against generation without capture.

    python benchmarks/capture_memory.py            # d_model 2048, 4 layers, 2,048-token completions, batch 8 (CPU)
    python benchmarks/capture_memory.py --quick    # 256-token completions

Three arms, each in a fresh process (peak RSS only grows within a process), on the same random-initialised
Llama config with SmolLM2's tokenizer (the tiny char tokenizer when it is not fetched): the continuous engine
without capture, with capture of all 4 layers keeping every position (how capture worked before boundary-only
recording), and with boundary-only recording (what ``rpe rollouts --capture-layers`` does now). Goal: peak RSS
of capture <= 1.1x that of generation alone. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

ARMS = ("no_capture", "capture_every_token", "capture_boundaries")


def run_arm(arm: str, new_tokens: int, batch: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rpe.generation import generate_from_ids
    from rpe.models import DEFAULT_MODEL, is_fetched, model_dir, prepare_tokenizer
    from rpe.sampling import SamplingConfig

    if is_fetched(DEFAULT_MODEL):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir(DEFAULT_MODEL))
        prepare_tokenizer(tok)
    else:
        from rpe.tiny import tiny_tokenizer

        tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=new_tokens + 512)
    torch.manual_seed(0)  # a fresh process per arm: the global seed is this arm's own
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # every row runs the whole budget
    prompts = [tok(f"Question {i}: what is {i} + {i}?\n\n", add_special_tokens=False)["input_ids"] for i in range(batch)]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    gen = generate_from_ids(model, tok, prompts, SamplingConfig(temperature=1.0, max_new_tokens=new_tokens), seed=0,
                            reuse_prefix=False, record_layers=None if arm == "no_capture" else [0, 1, 2, 3],
                            record_boundaries_only=arm == "capture_boundaries")
    seconds = time.perf_counter() - start
    kept = sum(a.numel() * a.element_size() for row in gen.activations for a in row.values())
    return {"arm": arm, "seconds": round(seconds, 2), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_after_load_mib": round(rss_before / 1024, 1), "bytes_kept_per_trajectory": kept // batch,
            "generated_tokens": sum(len(c) for c in gen.completion_ids)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    new_tokens = args.new_tokens or (256 if args.quick else 2048)
    if args.arm:
        print(json.dumps(run_arm(args.arm, new_tokens, args.batch)))
        return
    from rpe.bench.machine import machine_info

    arms = {}
    for arm in ARMS:
        out = subprocess.run([sys.executable, __file__, "--arm", arm, "--new-tokens", str(new_tokens), "--batch",
                              str(args.batch)], capture_output=True, text=True, check=True)
        arms[arm] = json.loads(out.stdout.strip().splitlines()[-1])
        print(arm, arms[arm], flush=True)
    base = arms["no_capture"]["peak_rss_mib"]
    result = {"machine": machine_info(), "new_tokens": new_tokens, "batch": args.batch, "arms": arms,
              "peak_rss_vs_no_capture": {a: round(arms[a]["peak_rss_mib"] / base, 3) for a in ARMS[1:]},
              "time_vs_no_capture": {a: round(arms[a]["seconds"] / arms["no_capture"]["seconds"], 3) for a in ARMS[1:]}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
