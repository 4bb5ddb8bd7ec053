"""Prompt selection by internal value in GRPO against its controls, several seeds, one command.

    python benchmarks/prompt_selection.py --bundle runs/demo/bundle --out runs/selection_mix --seeds 1000 2000 3000 \
        --max-steps 20 --task chain_sum_mix --max-completion-length 64 --select-low 0.4 --select-high 0.95 \
        --plot docs/selection_curves.png

Arms (recipes/, same task, budget, seeds and held-out problems; only the training prompts differ):

- ``grpo``: GRPO on every training prompt (recipes/grpo_baseline.yaml);
- ``value``: GRPO on the prompts whose V(s_0), read by one prefill before training, lies in the band
  (recipes/grpo_selected.yaml, ``select_by: value``);
- ``length``: the control that makes the same cut by question length (as many of the longest questions skipped
  as the band skipped as hopeless, as many of the shortest as it skipped as solved);
- ``random``: random skipping at the same keep rate;
- ``value_refresh``: the value band with V(s_0) read again every 5 steps with the policy as trained
  (``select_refresh_every``); its table line says how far the values moved and how many prompts crossed the band.

``--at-start`` measures the selection itself with more power and no training: for each seed's training
prompts, G samples each from the base policy (the recipe's temperature and budget), and the share of
zero-advantage groups among the prompts each rule keeps (value band; question length and random skipping at the
same keep rate; no selection; and ``value_middle``, the middle V(s_0) ranks at that rate, which needs no
calibration), with paired bootstrap intervals over prompts; the per-prompt values and solve rates are kept.

Per run, from TRL's log: the share of zero-advantage groups (``frac_reward_zero_std``: all samples of the prompt
got the same reward, nothing learnt), generated tokens (``completions/mean_length`` x completions per step) per
group with a non-zero advantage, the training reward of the first and last 10 steps; after training, held-out
accuracy (100 problems of a disjoint seed, shared by the arms of a seed) and how many of its outcomes training
changed, each arm's difference from ``grpo`` and
``value`` minus each control, paired by problem within seeds, with bootstrap intervals. Writes
OUT/selection_results.json (resumable: finished runs are kept) and prints Markdown tables (zero-advantage share with
a Wilson interval over the groups); the last line is JSON. ``--plot`` draws the share of informative groups and
the training reward against generated tokens, per arm, seeds pooled.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from training_arms import paired_accuracy_difference, per_problem_rewards, recipe_overrides, run_arms

ARMS = {
    "grpo": ("grpo_baseline.yaml", [], "GRPO on every prompt"),
    "value": ("grpo_selected.yaml", ["--select_by", "value"], "GRPO on prompts selected by V(s_0)"),
    "length": ("grpo_selected.yaml", ["--select_by", "length"], "control: selected by question length"),
    "random": ("grpo_selected.yaml", ["--select_by", "random"], "control: random skipping"),
    "value_refresh": ("grpo_selected.yaml", ["--select_by", "value", "--select_refresh_every", "5"],
                      "V(s_0) selection refreshed every 5 steps"),
}


def run_record(out: Path, outcome, wall: float, train_args) -> dict:
    """What one training run contributes: selection summary, zero-advantage share, tokens, rewards, held-out."""
    history = json.loads((out / "log_history.json").read_text())
    steps = [h for h in history if "rewards/correct/mean" in h]
    zero = [h["frac_reward_zero_std"] for h in steps if "frac_reward_zero_std" in h]
    lengths = [h["completions/mean_length"] for h in steps if "completions/mean_length" in h]
    return {
        "summary": outcome.summary, "wall_seconds": wall, "steps": len(steps),
        "zero_advantage_share": float(np.mean(zero)) if zero else None,
        "mean_completion_tokens": float(np.mean(lengths)) if lengths else None,
        "reward_first10": float(np.mean([h["rewards/correct/mean"] for h in steps[:10]])),
        "reward_last10": float(np.mean([h["rewards/correct/mean"] for h in steps[-10:]])),
        "reward_curve": [h["rewards/correct/mean"] for h in steps],
        "zero_curve": zero,
        "after": per_problem_rewards(out / "eval_after"),
        "completions_per_step": train_args.per_device_train_batch_size * train_args.gradient_accumulation_steps,
        "num_generations": train_args.num_generations,
    }


def at_start(args) -> dict:
    """Zero-advantage share among the prompts each rule keeps, on the base policy (no training), for each band
    of ``args.bands`` (the samples are drawn once)."""
    from rpe.bundle import SubsystemBundle
    from rpe.generation import generate_batch
    from rpe.sampling import SamplingConfig
    from rpe.selection import prompt_text, prompt_values
    from rpe.trainers.recipes import load_policy, parse_recipe, training_prompts
    from scipy.stats import spearmanr

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "grpo_selected.yaml"
    per_seed = []  # (seed, values, zero, tokens, question lengths, problem ids)
    for seed in args.seeds:
        rpe_args, train_args, model_args = parse_recipe(recipe, ["--bundle", args.bundle, "--seed", str(seed),
                                                                 *(["--task", args.task] if args.task else []),
                                                                 *(["--max_completion_length", str(args.max_completion_length)]
                                                                   if args.max_completion_length else [])])
        model, tok = load_policy(rpe_args, model_args, train_args.device)
        bundle = SubsystemBundle.load(rpe_args.bundle, model=model, tokenizer=tok)
        task, builder, dataset, problems = training_prompts(rpe_args, tok, seed)
        texts = [prompt_text(p, tok) for p in dataset["prompt"]]
        ids = dataset["problem_id"]
        g = train_args.num_generations
        sampling = SamplingConfig(temperature=train_args.temperature, max_new_tokens=train_args.max_completion_length)
        gen = generate_batch(model, tok, [t for t in texts for _ in range(g)], sampling, seed=seed,
                             add_special_tokens=False, stop_strings=builder.stop_strings)
        rewards = np.array([task.score(problems[ids[i // g]], text) for i, text in enumerate(gen.texts)]).reshape(-1, g)
        per_seed.append((seed, prompt_values(model, tok, bundle, texts), (rewards == rewards[:, :1]).all(1),
                         np.array([len(c) for c in gen.completion_ids]).reshape(-1, g).sum(1),
                         np.array([len(problems[i].prompt) for i in ids], float), ids, rewards.mean(1)))
    zero = np.concatenate([z for _, _, z, _, _, _, _ in per_seed]).astype(float)
    tokens = np.concatenate([t for _, _, _, t, _, _, _ in per_seed]).astype(float)
    values = np.concatenate([v for _, v, _, _, _, _, _ in per_seed])
    solved = np.concatenate([m for *_, m in per_seed])
    group = np.array([f"{seed}/{i}" for seed, _, _, _, _, ids, _ in per_seed for i in ids])
    out = {"n_prompts": len(zero), "samples_per_prompt": g, "seeds": args.seeds, "explore": args.explore_at_start,
           "task": args.task or "the recipe's", "max_completion_length": train_args.max_completion_length,
           "zero_advantage_share_all": float(zero.mean()),
           "all_fail_share": float((solved == 0).mean()), "all_succeed_share": float((solved == 1).mean()),
           "value_vs_solve_rate_spearman": float(spearmanr(values, solved)[0]),
           "per_prompt": {"group": group.tolist(), "value_s0": values.round(5).tolist(), "solve_rate": solved.tolist(),
                          "tokens": tokens.tolist(),
                          "question_chars": np.concatenate([q for _, _, _, _, q, _, _ in per_seed]).tolist()},
           "value_s0": {"min": float(values.min()), "max": float(values.max()),
                        "quantiles_10_50_90": np.quantile(values, [0.1, 0.5, 0.9]).tolist()}}
    out["bands"] = band_tables(out["per_prompt"], args.bands, args.explore_at_start, args.n_boot)
    return out


def band_tables(per_prompt: dict, bands: list[str], explore: float, n_boot: int) -> dict:
    """For each band ``low:high``, the zero-advantage share among the prompts each rule keeps (95% interval over
    prompts) and the value rule minus each; every seed's training set (the ``group`` prefix) selected on its own,
    as ``rpe train`` does."""
    from rpe.metrics import cluster_resamples
    from rpe.selection import SelectionConfig, band_cut, random_keep, select_by_score, select_by_value, select_matched

    values, solved = np.array(per_prompt["value_s0"]), np.array(per_prompt["solve_rate"])
    tokens, lengths = np.array(per_prompt["tokens"], float), np.array(per_prompt["question_chars"], float)
    group = np.array(per_prompt["group"])
    seeds = np.array([x.split("/", 1)[0] for x in group])
    zero = ((solved == 0) | (solved == 1)).astype(float)
    everything = np.arange(len(zero))
    boots = list(cluster_resamples(group, n_boot, 0))
    tables = {}
    for band in bands:
        low, high = (float(x) for x in band.split(":"))
        arrays = {r: np.zeros(len(zero), dtype=bool) for r in ("value", "value_middle", "length", "random", "none")}
        for seed in dict.fromkeys(seeds):
            m = seeds == seed
            cfg = SelectionConfig(low=low, high=high, explore=explore, seed=int(seed))
            keep = select_by_value(values[m], cfg)
            arrays["value"][m] = keep
            arrays["value_middle"][m] = select_by_score(values[m], int(keep.sum()))  # middle V ranks, same rate
            arrays["length"][m] = select_matched(-lengths[m], *band_cut(values[m], keep, cfg))
            arrays["random"][m] = random_keep(int(m.sum()), int(keep.sum()), seed=int(seed))
            arrays["none"][m] = True

        def share(idx: np.ndarray, rule: str) -> float:
            kept = idx[arrays[rule][idx]]
            return float(zero[kept].mean()) if len(kept) else float("nan")

        rules = {}
        for rule, mask in arrays.items():
            rules[rule] = {"kept_share": float(mask.mean()),
                           "zero_advantage_share": [share(everything, rule),
                                                    *np.nanpercentile([share(i, rule) for i in boots], [2.5, 97.5]).tolist()],
                           "tokens_per_informative_group": float(tokens[mask].sum() / max((1 - zero[mask]).sum(), 1e-9))}
            if rule != "value":
                diffs = [share(i, "value") - share(i, rule) for i in boots]
                rules[rule]["value_minus_this"] = [share(everything, "value") - share(everything, rule),
                                                   *np.nanpercentile(diffs, [2.5, 97.5]).tolist()]
        tables[band] = rules
    return tables


def plot_curves(results: dict, args, path: Path) -> None:
    """Per arm (seeds pooled step by step), against generated tokens: the share of groups so far that had a
    non-zero advantage (Wilson 95% band), the training reward (running mean over the groups so far; band: the
    range of the seeds' running means), and held-out accuracy before training (0 tokens) and after it (Wilson
    95%; the held-out set is evaluated at those two points only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rpe.metrics import wilson_interval

    fig, (ax_inf, ax_rew, ax_held) = plt.subplots(1, 3, figsize=(14, 3.8))
    before = [v for s in args.seeds if (v := results.get("before", {}).get(f"seed{s}"))]
    for offset, arm in enumerate(args.arms):
        runs = [results["runs"][f"{arm}/seed{s}"] for s in args.seeds if f"{arm}/seed{s}" in results["runs"]]
        if not runs:
            continue
        steps = min(len(r["zero_curve"]) for r in runs)
        per_step_tokens = np.mean([r["mean_completion_tokens"] * r["completions_per_step"] for r in runs]) * len(runs)
        tokens = per_step_tokens * np.arange(1, steps + 1)
        informative = np.cumsum([sum(1 - r["zero_curve"][i] for r in runs) for i in range(steps)])
        groups = len(runs) * np.arange(1, steps + 1)
        band = np.array([wilson_interval(int(round(k)), int(n)) for k, n in zip(informative, groups)])
        running = np.array([np.cumsum(r["reward_curve"][:steps]) / np.arange(1, steps + 1) for r in runs])
        line, = ax_inf.plot(tokens, informative / groups, label=ARMS[arm][2])
        ax_inf.fill_between(tokens, band[:, 0], band[:, 1], color=line.get_color(), alpha=0.15)
        ax_rew.plot(tokens, running.mean(0), color=line.get_color(), label=ARMS[arm][2])
        if len(runs) > 1:
            ax_rew.fill_between(tokens, running.min(0), running.max(0), color=line.get_color(), alpha=0.15)
        if len(before) == len(runs):
            points = [[v for b in before for v in b.values()], [v for r in runs for v in r["after"].values()]]
            x = np.array([0.0, tokens[-1]]) + offset * tokens[-1] * 0.01  # nudged apart so the bars do not hide
            acc = [np.mean(p) for p in points]
            ci = np.array([wilson_interval(int(round(sum(p))), len(p)) for p in points])
            ax_held.errorbar(x, acc, yerr=[np.subtract(acc, ci[:, 0]), np.subtract(ci[:, 1], acc)], marker="o",
                             capsize=3, color=line.get_color(), label=ARMS[arm][2])
    ax_inf.set(xlabel="generated tokens", ylabel="groups with a non-zero advantage (so far)", ylim=(0, 1))
    ax_rew.set(xlabel="generated tokens", ylabel="training reward (running mean; band: seed range)", ylim=(0, 1))
    ax_held.set(xlabel="generated tokens", ylabel="held-out accuracy (95% Wilson)", ylim=(0, 0.6))
    ax_inf.legend(fontsize=7)
    fig.suptitle(f"GRPO with prompt selection ({len(args.seeds)} seed(s) pooled)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def band_overrides(args) -> list[str]:
    """The recipe overrides of ``--select-low/--select-high/--select-explore``."""
    return recipe_overrides({"--select_low": args.select_low, "--select_high": args.select_high,
                             "--select_explore": args.select_explore})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/demo/bundle")
    ap.add_argument("--out", type=Path, default=Path("runs/selection"))
    ap.add_argument("--arms", nargs="*", default=list(ARMS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--max-steps", type=int, default=30)
    ap.add_argument("--select-low", type=float, default=None, help="the band's low end (default: the recipe's)")
    ap.add_argument("--select-high", type=float, default=None, help="the band's high end (default: the recipe's)")
    ap.add_argument("--select-explore", type=float, default=None, help="explore share (default: the recipe's)")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--at-start", action="store_true", help="measure the selection on the base policy, no training")
    ap.add_argument("--bands", nargs="*", default=["0.05:0.95", "0.2:0.9", "0.3:0.8"],
                    help="--at-start: value bands low:high to compare (the samples are drawn once)")
    ap.add_argument("--explore-at-start", type=float, default=0.0, help="--at-start: explore share of each band")
    ap.add_argument("--task", default=None, help="the training task (default: the recipe's)")
    ap.add_argument("--reanalyse", type=Path, default=None,
                    help="--at-start: recompute the bands from this saved result's per-prompt samples")
    ap.add_argument("--plot", type=Path, default=None, help="write the curves against generated tokens here (PNG)")
    ap.add_argument("--max-completion-length", type=int, default=None,
                    help="tokens per sample, in training and evaluation too (default: the recipe's)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.at_start:
        from rpe.bench.machine import machine_info

        if args.reanalyse:  # the saved samples, other bands or rules: no generation
            result = json.loads(args.reanalyse.read_text())
            result["bands"] = band_tables(result["per_prompt"], args.bands, args.explore_at_start, args.n_boot)
        else:
            result = {"benchmark": "prompt_selection_at_start", "machine": machine_info(), **at_start(args)}
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"selection_at_start_{args.task}.json" if args.task else "selection_at_start.json"
        (args.out / name).write_text(json.dumps(result, indent=1))
        print(f"{result['n_prompts']} prompts x {result['samples_per_prompt']} samples; zero-advantage share of all "
              f"groups {result['zero_advantage_share_all']:.3f}; V(s_0) 10/50/90%: {result['value_s0']['quantiles_10_50_90']}")
        print("| band | rule | kept | zero-advantage groups among kept (95% CI) | value minus this | tokens per informative group |")
        print("|---|---|---|---|---|---|")
        for band, rules in result["bands"].items():
            for rule, r in rules.items():
                z, d = r["zero_advantage_share"], r.get("value_minus_this")
                print(f"| {band} | {rule} | {r['kept_share']:.2f} | {z[0]:.3f} [{z[1]:.3f}, {z[2]:.3f}] | "
                      f"{f'{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]' if d else '-'} | {r['tokens_per_informative_group']:.0f} |")
        print(json.dumps(result))
        return
    from rpe.bench.machine import machine_info
    from rpe.metrics import wilson_interval

    results_path = args.out / "selection_results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": {}}
    results["machine"] = machine_info()
    band = band_overrides(args)
    common = recipe_overrides({"--task": args.task, "--max_completion_length": args.max_completion_length})
    results["band_overrides"], results["task_overrides"] = band, common
    run_arms(args, ARMS, results, results_path, record=run_record,
             overrides_for=lambda recipe: common + (band if recipe == "grpo_selected.yaml" else []))

    print("\n| arm | seeds | kept prompts | zero-advantage groups (95% CI) | tokens per informative group | "
          "reward first 10 / last 10 | held-out after (95% CI) | held-out outcomes changed | minus GRPO |")
    print("|---|---|---|---|---|---|---|---|---|")
    table = {}
    for arm in args.arms:
        runs = [results["runs"][f"{arm}/seed{s}"] for s in args.seeds if f"{arm}/seed{s}" in results["runs"]]
        if not runs:
            continue
        k, n = sum(sum(r["after"].values()) for r in runs), sum(len(r["after"]) for r in runs)
        lo, hi = wilson_interval(int(k), n)
        zero = float(np.mean([r["zero_advantage_share"] for r in runs]))
        groups_per_step = [r["completions_per_step"] / r["num_generations"] for r in runs]
        tokens = [r["mean_completion_tokens"] * r["completions_per_step"] * r["steps"] for r in runs]
        informative = [(1 - r["zero_advantage_share"]) * g * r["steps"] for r, g in zip(runs, groups_per_step)]
        per_group = float(np.sum(tokens) / max(np.sum(informative), 1e-9))
        n_groups = int(round(sum(g * r["steps"] for r, g in zip(runs, groups_per_step))))
        zero_ci = wilson_interval(round(sum(r["zero_advantage_share"] * g * r["steps"]
                                            for r, g in zip(runs, groups_per_step))), n_groups)
        # held-out problems whose outcome after training differs from before (0: training moved nothing held out)
        changed = sum(sum(r["after"][p] != results["before"][f"seed{s}"][p] for p in r["after"])
                      for s, r in zip([s for s in args.seeds if f"{arm}/seed{s}" in results["runs"]], runs))
        kept = [r["summary"].get("prompt_selection", {}).get("kept_share", 1.0) for r in runs]
        both = [s for s in args.seeds if f"{arm}/seed{s}" in results["runs"] and f"grpo/seed{s}" in results["runs"]]
        diff = (paired_accuracy_difference([results["runs"][f"{arm}/seed{s}"]["after"] for s in both],
                                           [results["runs"][f"grpo/seed{s}"]["after"] for s in both], args.n_boot, 0)
                if arm != "grpo" and both else None)
        table[arm] = {"seeds": len(runs), "kept_share": float(np.mean(kept)), "zero_advantage_share": zero,
                      "zero_advantage_ci95": list(zero_ci), "groups": n_groups, "held_out_changed": changed,
                      "zero_advantage_by_seed": [r["zero_advantage_share"] for r in runs],
                      "tokens_per_informative_group": per_group, "accuracy": k / n, "ci95": [lo, hi],
                      "minus_grpo": diff, "reward_first10": float(np.mean([r["reward_first10"] for r in runs])),
                      "reward_last10": float(np.mean([r["reward_last10"] for r in runs]))}
        d = f"{diff['diff']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]" if diff else "-"
        t = table[arm]
        print(f"| {ARMS[arm][2]} | {len(runs)} | {t['kept_share']:.2f} | {zero:.2f} [{zero_ci[0]:.2f}, {zero_ci[1]:.2f}] "
              f"of {n_groups} | {per_group:.0f} | {t['reward_first10']:.2f} / {t['reward_last10']:.2f} | "
              f"{k / n:.3f} [{lo:.3f}, {hi:.3f}] | {changed} of {n} | {d} |")
    refreshed = [results["runs"][key]["summary"]["prompt_selection"].get("refreshes") or []
                 for key in (f"value_refresh/seed{s}" for s in args.seeds) if key in results["runs"]]
    if "value_refresh" in args.arms and any(refreshed):
        flat = [h for history in refreshed for h in history]
        table["value_refresh"]["refreshes"] = {
            "n": len(flat), "value_shift_mean": float(np.mean([h["value_shift"] for h in flat])),
            "value_shift_max": float(np.max([h["value_shift"] for h in flat])),
            "band_changed_mean": float(np.mean([h["band_changed"] for h in flat])),
            "changed_mean": float(np.mean([h["changed"] for h in flat]))}
        r = table["value_refresh"]["refreshes"]
        print(f"\nrefreshes: {r['n']} over {len(refreshed)} seeds; V(s_0) moved {r['value_shift_mean']:.4f} on average "
              f"(largest {r['value_shift_max']:.4f}); prompts crossing the band {r['band_changed_mean']:.1%}; kept "
              f"set changed {r['changed_mean']:.1%} (with the explore redraw)")
    for control in ("length", "random"):
        both = [s for s in args.seeds if f"value/seed{s}" in results["runs"] and f"{control}/seed{s}" in results["runs"]]
        if both:
            vs = paired_accuracy_difference([results["runs"][f"value/seed{s}"]["after"] for s in both],
                                            [results["runs"][f"{control}/seed{s}"]["after"] for s in both], args.n_boot, 1)
            zero_diff = [results["runs"][f"value/seed{s}"]["zero_advantage_share"]
                         - results["runs"][f"{control}/seed{s}"]["zero_advantage_share"] for s in both]
            table["value"][f"minus_{control}"] = {"accuracy": vs, "zero_advantage_by_seed": zero_diff}
            print(f"\nvalue minus {control}: held-out {vs['diff']:+.3f} [{vs['low']:+.3f}, {vs['high']:+.3f}]; "
                  f"zero-advantage share per seed {['%+.2f' % z for z in zero_diff]}")
    results["table"] = table
    results_path.write_text(json.dumps(results, indent=1, default=str))
    if args.plot:
        plot_curves(results, args, args.plot)
        print(f"curves: {args.plot}")
    print(json.dumps({"benchmark": "prompt_selection", "machine": results["machine"], "max_steps": args.max_steps,
                      "seeds": args.seeds, "table": table}))


if __name__ == "__main__":
    main()
