"""Commands that find the subsystem: ``rpe fit`` (value neurons) and ``rpe dopamine``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from rpe.cli.common import (
    ATTN_OPTION, DEVICE_MAP_OPTION, DEVICE_OPTION, DTYPE_OPTION, app, console, fail, interval_text,
    load_cli_model, parse_layers, progress_bar, rollout_model_name, short_name,
)


@app.command("fit")
def fit(
    rollouts: Path = typer.Option(..., help="Rollout folder from `rpe rollouts`."),
    out: Path = typer.Option(..., help="Bundle folder to write."),
    model: Optional[str] = typer.Option(None, help="Model (default: the one named in the rollouts' manifest)."),
    layers: Optional[str] = typer.Option(None, help="Comma-separated layers to sweep (default: every --layer-stride-th)."),
    layer_stride: int = typer.Option(2, help="Stride of the default layer sweep."),
    target: str = typer.Option("td0", help="Probe target: td0, td_lambda or mc."),
    family: str = typer.Option("mlp", help="Probe family: mlp (PAPER.md, the default) or linear (L2 logistic, fast)."),
    sweep_family: str = typer.Option("linear", help="Probe family of the layer sweep (it only picks the layer): linear or mlp."),
    top_frac: float = typer.Option(0.01, help="Fraction of neurons kept as value neurons."),
    folds: int = typer.Option(5, help="Cross-validation folds by problem (every problem scored once)."),
    compare_probes: bool = typer.Option(False, help="Also cross-validate every probe family x target at the best layer."),
    sparsity_draws: int = typer.Option(20, help="Random neuron sets per pruning fraction in the sparsity control "
                                       "(the card's sparsity row; 0 skips it)."),
    epochs: int = typer.Option(100, help="MLP probe training epochs (early stopping on validation)."),
    seed: int = typer.Option(0, help="Seed of the folds and the probe."),
    n_boot: int = typer.Option(1000, help="Bootstrap resamples for the intervals."),
    save_states: bool = typer.Option(True, help="Also write BUNDLE/states.safetensors (captured activations)."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    device_map: Optional[str] = DEVICE_MAP_OPTION,
    attn_implementation: Optional[str] = ATTN_OPTION,
) -> None:
    """Find value neurons: capture states, sweep layers, prune, refit, all cross-validated by problem; write the
    bundle and metrics.json."""
    from rpe.difficulty import difficulty_from_run
    from rpe.fit import FitConfig, fit_bundle
    from rpe.models import fingerprint as fp_of
    from rpe.probe import ProbeConfig, SingleClassError
    from rpe.records import read_trajectories

    try:
        cfg = FitConfig(layers=parse_layers(layers), layer_stride=layer_stride, top_frac=top_frac, folds=folds,
                        compare_probes=compare_probes, n_boot=n_boot, sweep_family=sweep_family,
                        sparsity_draws=sparsity_draws,
                        probe=ProbeConfig(target=target, family=family, epochs=epochs, seed=seed))
        trajectories = read_trajectories(rollouts)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    name = rollout_model_name(rollouts, model)
    lm, tokenizer = load_cli_model(name, device, dtype, device_map, attn_implementation)
    recorded = trajectories[0].model
    if recorded:
        from rpe.models import ModelFingerprint

        bad = ModelFingerprint.from_dict(recorded).mismatches(fp_of(lm, tokenizer))
        if bad:
            fail(f"the rollouts were made with {recorded['name']!r}, which differs from {name!r} in {', '.join(bad)}")
    captured = None
    if (rollouts / "states.safetensors").exists():
        from rpe.store import StateSet

        captured = StateSet.load(rollouts / "states.safetensors")
        console.print(f"using activations captured during generation: layers {captured.layers}")
    difficulty = difficulty_from_run(rollouts, trajectories)
    if difficulty is None:
        console.print("the task has no difficulty features: no difficulty control, no within-difficulty AUROC")
    with console.status("fitting value probes") as status:
        try:
            bundle, states = fit_bundle(lm, tokenizer, trajectories, cfg, model_name=name, states=captured,
                                        difficulty=difficulty, progress=status.update)
        except (SingleClassError, ValueError) as err:
            fail(str(err))
    bundle.save(out)
    if save_states:
        states.save(out / "states.safetensors")
    _print_fit_metrics(bundle.metrics, out)


@app.command("dopamine")
def dopamine(
    rollouts: Path = typer.Option(..., help="Rollout folder from `rpe rollouts`."),
    bundle: Path = typer.Option(..., help="Bundle folder from `rpe fit` (updated in place, atomically)."),
    n_continuations: int = typer.Option(4, help="Continuations sampled per state for its Monte-Carlo value."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Token budget of one continuation (default: the "
                                                 "longest completion in the rollouts)."),
    max_trajectories: Optional[int] = typer.Option(None, help="Use only the first N trajectories."),
    threshold: float = typer.Option(0.3, help="Keep steps with |RPE| above this."),
    top_frac: float = typer.Option(0.01, help="Fraction of neurons reported as dopamine neurons."),
    sweep_layers: str = typer.Option("", help="Comma-separated layers searched too, on the same steps and split "
                                     "(e.g. 8,14,20,24); the bundle keeps its own layer's neurons."),
    seed: int = typer.Option(0, help="Seed of sampling, split and predictor."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    device_map: Optional[str] = DEVICE_MAP_OPTION,
    attn_implementation: Optional[str] = ATTN_OPTION,
) -> None:
    """Find dopamine neurons: Monte-Carlo step values, TD errors, neurons that track them."""
    from rpe.bundle import BundleFormatError, SubsystemBundle
    from rpe.distributed import process_group
    from rpe.dopamine import DopamineConfig, dopamine_from_rollouts
    from rpe.metrics import chance_verdict
    from rpe.report_card import INCONCLUSIVE, dopamine_row

    try:
        cfg = DopamineConfig(n_continuations=n_continuations, max_new_tokens=max_new_tokens, threshold=threshold,
                             top_frac=top_frac, seed=seed)
        b = SubsystemBundle.load(bundle)
        sweep = [int(x) for x in sweep_layers.split(",") if x.strip()]
    except (ValueError, BundleFormatError) as err:
        fail(str(err))
    # launched (torchrun): the Monte-Carlo values are shared out over the ranks; each rank then reads the steps
    # and fits the same neurons, and the main rank saves the bundle and reports
    with process_group() as ranks:
        lm, tokenizer = load_cli_model(rollout_model_name(rollouts, None), device, dtype, device_map, attn_implementation)
        with progress_bar(ranks) as bar:
            job = bar.add_task("Monte-Carlo values of states (cached ones skipped; then one forward reads the steps)",
                               total=None)
            try:
                result = dopamine_from_rollouts(
                    lm, tokenizer, rollouts, b, cfg, max_trajectories=max_trajectories, sweep_layers=sweep,
                    progress=lambda done, total: bar.update(job, completed=done, total=total),
                )
            except ValueError as err:
                fail(str(err))
    if not ranks.is_main:
        return
    b.save(bundle)
    m = result.metrics
    table = Table(title=f"dopamine neurons, layer {b.layer} (held-out steps with |RPE| > {threshold})")
    table.add_column("neuron set")
    table.add_column("Spearman with RPE (95% CI over problems)")
    table.add_column("permutation p")
    table.add_row(f"dopamine ({m['n_neurons']})",
                  f"{m['test_spearman_dopamine']:.3f} [{m['test_spearman_low']:.3f}, {m['test_spearman_high']:.3f}]",
                  f"{m['test_permutation_p']:.3g}")
    table.add_row(f"random ({m['n_neurons']}), mean of {cfg.n_random}",
                  f"{m['test_spearman_random_mean']:.3f} (95th pct {m['test_spearman_random_q95']:.3f})")
    console.print(table)
    verdict = chance_verdict(m["test_spearman_low"], m["test_spearman_high"], chance=0.0)
    row = dopamine_row(m)  # the report card's rule: fewer than 300 surprising steps cannot decide
    if row.verdict == INCONCLUSIVE:
        verdict = f"{row.verdict}, {row.note} (the interval alone reads {verdict})"
    console.print(f"held-out Spearman: {verdict} ({m['n_test']} held-out steps of {m['n_test_problems']} problems; "
                  f"{m['test_random_sets_at_least']:.0%} of random sets reach it)")
    console.print(
        f"signed activity: {m['test_activity_positive_rpe']:.3f} for positive RPE, "
        f"{m['test_activity_negative_rpe']:.3f} for negative ({m['n_surprising']} surprising of {m['n_steps']} steps)"
    )
    console.print(f"neurons {result.neurons.tolist()} signs {result.sign.tolist()} -> {bundle}")
    if "by_layer" in m:
        sweep_table = Table(title="the same search at each layer (held-out surprising steps; p Bonferroni-adjusted "
                                  "for the layers searched)")
        for col in ("layer", "Spearman with RPE (95% CI)", "random 95th pct", "p", "p adjusted"):
            sweep_table.add_column(col)
        for layer, r in m["by_layer"].items():
            sweep_table.add_row(layer, f"{r['test_spearman_dopamine']:.3f} [{r['test_spearman_low']:.3f}, "
                                f"{r['test_spearman_high']:.3f}]", f"{r['test_spearman_random_q95']:.3f}",
                                f"{r['test_permutation_p']:.3g}", f"{r['p_bonferroni']:.3g}")
        console.print(sweep_table)



def _print_fit_metrics(metrics: dict, out: Path) -> None:
    from rpe.fit import power_note

    head = metrics["headline_cv"]
    table = Table(title=f"value probe, layer {metrics['best_layer']}: {metrics['folds']}-fold cross-validated by problem, "
                        f"{metrics['n_trajectories']} trajectories (95% problem-clustered bootstrap CI)")
    table.add_column("AUROC of", overflow="fold", ratio=3)
    for where in ("s_0", "final step"):
        table.add_column(f"at {where}", overflow="fold", ratio=2)
        table.add_column("reading", overflow="fold", ratio=2)
    for name in head["s0"]:
        cells = []
        for where in ("s0", "final"):
            m = head[where][name]
            cells += [interval_text(m), m["verdict"]]
        table.add_row(short_name(name), *cells)
    console.print(table)
    beyond = metrics.get("beyond_difficulty") or {}
    if beyond:
        t = Table(title="value beyond difficulty (AUROC counting only pairs of equal difficulty; probe with difficulty regressed out)")
        t.add_column("AUROC of", no_wrap=True)
        t.add_column("at s_0")
        t.add_column("at final step")
        for name in beyond["within_strata_s0"]:
            t.add_row(f"{short_name(name)}, within strata", *(interval_text(beyond[f"within_strata_{w}"][name]) for w in ("s0", "final")))
        for key in ("residualised_all_neurons", "residualised_value_neurons"):
            t.add_row(key.replace("_", " "), *(interval_text(beyond[key][w]) for w in ("s0", "final")))
        console.print(t)
    curve = Table(title="pruning curve (cross-validated AUROC; neurons ranked inside each fold)")
    for col in ("kept", "neurons", "refit", "AUROC s_0", "AUROC final"):
        curve.add_column(col)
    for row in metrics["pruning_curve"]:
        curve.add_row(f"{row['frac']:g}", str(row["n_neurons"]), row.get("refit_family", "-"), interval_text(row["s0"]),
                      interval_text(row["final"]))
    console.print(curve)
    sparsity = metrics.get("sparsity")
    if sparsity:
        from rpe.report_card import sparsity_row

        t = Table(title=f"sparsity control: each selection against {sparsity['n_draws']} random sets of its size "
                        "(the same logistic refit; selected minus random mean, paired 95% CI; rank among the draws)")
        for col in ("method", "kept", "AUROC s_0", "- random", "AUROC final", "- random"):
            t.add_column(col, overflow="fold")
        for row in sparsity["rows"]:
            cells = []
            for where in ("s0", "final"):
                r = row["vs_random"][where]
                cells += [interval_text(row[where]), f"{r['diff']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}], "
                                                     f"{r['rank']}/{r['n_draws']} reach it"]
            t.add_row(row["method"], f"{row['frac']:g} ({row['k']})", *cells)
        console.print(t)
        card = sparsity_row(metrics)
        console.print(f"card: {card.claim}: [bold]{card.verdict}[/] ({card.note})", soft_wrap=True)
    note = power_note(metrics)
    if note:
        console.print(f"[bold yellow]{note}[/]", soft_wrap=True)
    console.print(f"bundle -> {out} (metrics.json beside it)")
