"""What the internal signals cost when vLLM generates (TRL's ``use_vllm``): one hooked forward per batch.

    python benchmarks/vllm_read_cost.py              # SmolLM2-135M-Instruct, 4 prompts x 4 completions, 128 tokens
    python benchmarks/vllm_read_cost.py --quick      # 2 x 2 completions, 32 tokens

Under vLLM the policy's own ``generate`` is never called, so :class:`rpe.trainers.rewards.InternalSignals`
cannot record the value neurons while the completions are sampled: it reads them with one
``SignalReader.read`` (a forward over prompt + completion, the shared few-shot prefix encoded once, stopped
after the bundle's layer). This measures that read against what it rides on, in the same run on the same batch:

- ``generate``: the batch sampled by transformers' ``model.generate`` (what TRL calls without vLLM; a CPU
  stand-in for the generation vLLM does on a GPU, which does not run here);
- ``generate_with_capture``: the same with the value-neuron capture the non-vLLM path uses (no extra forward);
- ``read``: the one hooked forward the vLLM path adds.

Ratios (``read / generate``, ``capture overhead``) are what carries over to other machines, not the seconds.
The bundle is random (the cost does not depend on its numbers). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--completions", type=int, default=4, help="completions per prompt (GRPO's num_generations)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.completions, args.max_new_tokens, args.repeats = 2, 2, 32, 1

    from rpe.bench.machine import machine_info, timeit
    from rpe.bundle import random_bundle
    from rpe.generation import generate_from_ids
    from rpe.models import load_model
    from rpe.prompts import PromptBuilder, PromptConfig
    from rpe.sampling import SamplingConfig
    from rpe.signals import GenerationCapture, SignalReader
    from rpe.tasks import DEFAULT_TASK, load_task

    model, tok = load_model(args.model)
    bundle = random_bundle(model, tok, layer=model.config.num_hidden_layers * 2 // 3)
    task = load_task(DEFAULT_TASK)
    builder = PromptBuilder(task, tok, PromptConfig(shots=6), seed=0)
    problems = list(task.problems(args.prompts, seed=0))
    prompt_ids = [tok(builder(p), add_special_tokens=False)["input_ids"] for p in problems for _ in range(args.completions)]
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=args.max_new_tokens)

    def generate():
        return generate_from_ids(model, tok, prompt_ids, sampling, stop_strings=builder.stop_strings, seed=0,
                                 engine="generate")  # transformers' model.generate, which TRL calls without vLLM

    batch = generate()
    reader = SignalReader(bundle, model, tok)

    def generate_with_capture():
        capture = GenerationCapture(model, bundle.layer, reader.columns).install()
        try:
            return generate()
        finally:
            capture.remove()

    def read():
        return reader.read(prompt_ids, batch.completion_ids)

    seconds = {name: timeit(fn, args.repeats) for name, fn in
               (("generate", generate), ("generate_with_capture", generate_with_capture), ("read", read))}
    tokens = sum(len(c) for c in batch.completion_ids)
    result = {
        "benchmark": "vllm_read_cost", "machine": machine_info(), "model": args.model,
        "sequences": len(prompt_ids), "completion_tokens": tokens, "prompt_tokens": len(prompt_ids[0]),
        "seconds": seconds,
        "read_over_generate": seconds["read"] / seconds["generate"],
        "capture_overhead": seconds["generate_with_capture"] / seconds["generate"] - 1.0,
    }
    print(f"{len(prompt_ids)} sequences, {tokens} completion tokens: generate {seconds['generate']:.2f} s, "
          f"with capture {seconds['generate_with_capture']:.2f} s, one read {seconds['read']:.2f} s "
          f"({result['read_over_generate']:.1%} of generation)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
