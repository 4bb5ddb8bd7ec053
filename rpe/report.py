"""A self-contained HTML summary of a rollout folder (plots embedded as PNG, opens offline).

All model and user text is HTML-escaped: a completion holding ``<script>`` shows as text.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from pathlib import Path

import numpy as np

from rpe.records import MANIFEST_FILE, Trajectory, atomic_write_bytes, read_trajectories


def png_bytes(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _steps_plot(trajectories: list[Trajectory]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    for label, want in (("correct", 1.0), ("incorrect", 0.0)):
        counts = Counter(len(t.steps) for t in trajectories if (t.reward >= 0.5) == (want == 1.0))
        xs = sorted(counts)
        ax.bar([x + (0.2 if want else -0.2) for x in xs], [counts[x] for x in xs], width=0.4, label=label)
    ax.set_xticks(sorted({len(t.steps) for t in trajectories}))
    ax.set_xlabel("reasoning steps per completion")
    ax.set_ylabel("trajectories")
    ax.legend()
    return png_bytes(fig)


def _trajectory_html(t: Trajectory) -> str:
    e = html.escape
    steps = "".join(f"<li><pre>{e(s.text)}</pre></li>" for s in t.steps) or "<li><em>(no steps)</em></li>"
    verdict = "correct" if t.reward >= 0.5 else "incorrect"
    return (
        f'<div class="traj {verdict}"><h4>{e(t.trajectory_id)} · {verdict} · answer {e(str(t.final_answer))} '
        f"(reference {e(t.reference_answer)}) · finish: {e(t.finish_reason)}</h4><ol>{steps}</ol></div>"
    )


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and x != x) else f"{x:.3f}"


def _line_plot(xs, series: dict[str, list[float]], xlabel: str, ylabel: str, logx: bool = False,
               bands: dict[str, tuple[list[float], list[float]]] | None = None, title: str = "") -> str:
    """Lines with markers against a dashed chance line at 0.5; ``bands``: a series' 95% interval (low, high),
    shaded in its colour; a series whose label says "random" is drawn dashed (a control)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for label, ys in series.items():
        line, = ax.plot(xs, ys, marker="o", label=label, ls="--" if "random" in label else "-")
        if bands and label in bands:
            lo, hi = bands[label]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    if logx:
        ax.set_xscale("log")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return png_bytes(fig)


def report_card_section(bundle_dir: str | Path, *, ablation: dict | None = None, search: dict | None = None) -> str:
    """HTML that opens a report: the smoke-run warning when the value signal has no power, then the report card
    (one row per paper claim measured in this bundle, and in ``rpe ablate``'s / ``rpe search``'s results when
    given)."""
    import json

    from rpe.fit import power_note
    from rpe.report_card import card_rows, to_html

    m = json.loads((Path(bundle_dir) / "bundle.json").read_text())["metrics"]
    if "headline_cv" not in m:
        return "<p>This bundle predates cross-validated metrics; re-run <code>rpe fit</code> for a report card.</p>"
    note = power_note(m)
    warn = f'<p class="warn"><b>{html.escape(note)}</b></p>' if note else ""
    return warn + to_html(card_rows(m, ablation=ablation, search=search, include_unmeasured=False))


def _probe_text(probe) -> str:
    """A probe's settings in words ("MLP probe, td0 target"), not its raw dict."""
    if not isinstance(probe, dict):
        return f"{probe} target"
    family = {"mlp": "MLP", "linear": "linear"}.get(probe.get("family"), str(probe.get("family", "")))
    return f"{family} probe, {probe.get('target', '?')} target"


def bundle_section(bundle_dir: str | Path) -> str:
    """HTML for a bundle's metrics: headline AUROCs beside controls, layer sweep, pruning curve, dopamine."""
    import json

    e = html.escape
    meta = json.loads((Path(bundle_dir) / "bundle.json").read_text())
    m = meta["metrics"]
    if "headline_cv" not in m:
        return (f"<h2>Value neurons (layer {meta['layer']})</h2><p>This bundle was fitted before cross-validated metrics; "
                "re-run <code>rpe fit</code> for intervals, readings and the report card.</p>")
    head = m["headline_cv"]

    def cell(r: dict) -> str:
        point = r.get("auroc", r.get("diff"))
        return f"<td>{_fmt(point)} [{_fmt(r['low'])}, {_fmt(r['high'])}]</td><td>{e(r.get('verdict', ''))}</td>"

    rows = "".join(f"<tr><td>{e(name)}</td>{cell(head['s0'][name])}{cell(head['final'][name])}</tr>" for name in head["s0"])
    layers = sorted(int(k) for k in m["layer_sweep"])
    sweep = _line_plot(layers, {
        "inner validation (chooses the layer)": [m["layer_sweep"][str(k)]["val_auroc_all"] for k in layers],
        "cross-validated, s_0": [m["layer_sweep"][str(k)]["cv_auroc_s0"] for k in layers],
        "cross-validated, final": [m["layer_sweep"][str(k)]["cv_auroc_final"] for k in layers]}, "layer", "AUROC",
        title="Layer sweep: AUROC of the probe at each layer")
    curve = m["pruning_curve"]
    lines = {"s_0": [r["cv_auroc_s0"] for r in curve], "final step": [r["cv_auroc_final"] for r in curve]}
    sparsity = m.get("sparsity") or {}
    control = {r["frac"]: r for r in sparsity.get("rows", []) if r["method"] == "first_layer_norm"}
    if control:  # the random sets of each size, same refit: the line the selected sets must clear
        for where, label in (("s0", "s_0"), ("final", "final step")):
            lines[f"random sets (logistic refit), {label}"] = [control[r["frac"]]["vs_random"][where]["random_mean"]
                                              if r["frac"] in control else float("nan") for r in curve]
    bands = {label: ([r[where]["low"] for r in curve], [r[where]["high"] for r in curve])
             for where, label in (("s0", "s_0"), ("final", "final step")) if all(where in r for r in curve)}
    prune = _line_plot([r["frac"] for r in curve], lines, "fraction of neurons kept", "cross-validated AUROC", logx=True,
                       bands=bands, title="Pruning curve: the kept neurons against random sets of the same size "
                                          "(bands: 95% over problems)")
    parts = [
        f"<h2>Value neurons (layer {m['best_layer']}, {meta['n_value_neurons']} neurons, {e(_probe_text(m.get('probe', m['target'])))})</h2>",
        f"<table><tr><th>AUROC of ({m['folds']}-fold cross-validated by problem, {m['n_trajectories']} trajectories, "
        "95% problem-clustered CI)</th><th>at s_0</th><th>reading</th><th>at final step</th><th>reading</th></tr>" + rows + "</table>",
    ]
    beyond = m.get("beyond_difficulty") or {}
    if beyond:
        brows = "".join(
            f"<tr><td>{e(name)}, within difficulty strata</td>{cell(beyond['within_strata_s0'][name])}"
            f"{cell(beyond['within_strata_final'][name])}</tr>" for name in beyond["within_strata_s0"]
        ) + "".join(
            f"<tr><td>{e(key.replace('_', ' '))} (difficulty regressed out)</td>{cell(beyond[key]['s0'])}{cell(beyond[key]['final'])}</tr>"
            for key in ("residualised_all_neurons", "residualised_value_neurons")
        )
        parts.append("<h3>Value beyond difficulty</h3><table><tr><th>AUROC of</th><th>at s_0</th><th>reading</th>"
                     "<th>at final step</th><th>reading</th></tr>" + brows + "</table>")
    parts += [f'<h3>Layer sweep</h3><img alt="layer sweep" src="{sweep}">',
              f'<h3>Pruning curve</h3><img alt="pruning curve" src="{prune}">']
    if sparsity:
        srows = "".join(
            f"<tr><td>{e(r['method'])}</td><td>{r['frac']:g} ({r['k']})</td>" + "".join(
                f"{cell(r[w])}<td>{_fmt(r['vs_random'][w]['diff'])} [{_fmt(r['vs_random'][w]['low'])}, "
                f"{_fmt(r['vs_random'][w]['high'])}], {r['vs_random'][w]['rank']} of {r['vs_random'][w]['n_draws']} reach it</td>"
                for w in ("s0", "final")) + "</tr>" for r in sparsity["rows"])
        parts.append(f"<h3>Sparsity control</h3><p>Each selection method, neurons ranked inside each fold, against "
                     f"{sparsity['n_draws']} random sets of the same size (massive-activation dimensions excluded), "
                     "the same logistic refit for every set; selected minus the random sets' mean with a paired 95% "
                     "interval.</p><table><tr><th>selection</th><th>kept</th><th>AUROC s_0</th><th></th>"
                     "<th>minus random, s_0</th><th>AUROC final</th><th></th><th>minus random, final</th></tr>"
                     + srows + "</table>")
    if "dopamine" in m:
        d = m["dopamine"]
        parts.append(
            f"<h2>Dopamine neurons ({d['n_neurons']})</h2><table>"
            f"<tr><td>Spearman with RPE, dopamine neurons (held out)</td><td>{_fmt(d['test_spearman_dopamine'])}</td></tr>"
            f"<tr><td>Spearman with RPE, random neurons (mean / 95th pct)</td><td>{_fmt(d['test_spearman_random_mean'])} / "
            f"{_fmt(d['test_spearman_random_q95'])}</td></tr>"
            f"<tr><td>signed activity for positive / negative RPE</td><td>{_fmt(d['test_activity_positive_rpe'])} / "
            f"{_fmt(d['test_activity_negative_rpe'])}</td></tr>"
            f"<tr><td>surprising steps / all steps</td><td>{d['n_surprising']} / {d['n_steps']}</td></tr></table>"
        )
    return "".join(parts)


def _drops_plot(drops: list[dict]) -> str:
    """Horizontal bars: each arm's accuracy drop against no ablation on the same problems, 95% paired interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"layer {r['layer']}: {r['arm']}" for r in drops]
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(drops) + 1.3))
    ys = np.arange(len(drops))[::-1]
    colors = ["#b42318" if r["arm"] == "value" else "#667085" for r in drops]
    ax.barh(ys, [r["drop"] for r in drops], color=colors, alpha=0.8,
            xerr=[[r["drop"] - r["low"] for r in drops], [r["high"] - r["drop"] for r in drops]], capsize=3)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("accuracy drop vs no ablation (share of problems)")
    ax.set_title(f"Ablation: drop with 95% paired interval over problems (n = {drops[0]['n']} per arm)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return png_bytes(fig)


def ablation_section(ablate_dir: str | Path) -> str:
    """HTML for an ``rpe ablate`` folder: each arm's drop against no ablation on the same problems with its paired
    95% interval (table and plot), value neurons against each control, and the accuracy-by-layer plot."""
    import json

    from rpe.ablate import paired_drops
    from rpe.metrics import difference_verdict

    e = html.escape
    ablate_dir = Path(ablate_dir)
    res = json.loads((ablate_dir / "results.json").read_text())
    drops = paired_drops(ablate_dir)

    def interval(d: dict) -> str:
        return f"{d['diff' if 'diff' in d else 'drop']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"

    rows = "".join(
        f"<tr><td>{r['layer']}</td><td>{e(r['arm'])}</td><td>{r['accuracy']:.3f}</td><td>{interval(r)}</td>"
        f"<td>{e(difference_verdict(r['low'], r['high']).replace('higher', 'drops').replace('lower', 'gains'))}</td>"
        f"<td>{r['lost']} / {r['won']}</td></tr>" for r in drops)
    versus = "".join(
        f"<tr><td>{r['layer']}</td><td>{e(key.removeprefix('vs '))}</td><td>{interval(v)}</td>"
        f"<td>{e(difference_verdict(v['low'], v['high']).replace('higher', 'control higher').replace('lower', 'value neurons higher'))}</td></tr>"
        for r in drops for key, v in r.items() if key.startswith("vs "))
    out = (f"<h2>Ablation ({res['n_neurons']} neurons per set; no ablation: {res['baseline']['accuracy']:.3f})</h2>"
           + (f'<img alt="ablation drops" src="{_drops_plot(drops)}">' if drops else "")
           + "<table><tr><th>layer</th><th>set zeroed</th><th>accuracy</th><th>drop vs none [95% paired]</th>"
           f"<th>reading</th><th>problems lost / won</th></tr>{rows}</table>")
    if versus:
        out += ("<h3>Value neurons against their controls (control accuracy minus value-ablated accuracy, same "
                "problems)</h3><table><tr><th>layer</th><th>control</th><th>difference [95% paired]</th><th>reading"
                f"</th></tr>{versus}</table>")
    if len(res["layers"]) > 1:
        out += _png_img(ablate_dir / "ablation.png", "ablation by layer")
    causal = ablate_dir / "causal_rpe.json"
    if causal.is_file():
        c = json.loads(causal.read_text())
        rows = "".join(f"<tr><td>{float(share):.0%} ({r['n_neurons']})</td><td>{_fmt(r['value'])}</td>"
                       f"<td>{_fmt(r['random_mean'])}</td></tr>" for share, r in c["shares"].items())
        out += (f"<h3>Causal RPE check (zeroed at layer {c['ablation_layer']}, dopamine neurons at layer "
                f"{c['dopamine_layer']}; no ablation: {_fmt(c['baseline'])})</h3><table><tr><th>share zeroed</th>"
                f"<th>Spearman, value-ranked zeroed</th><th>random zeroed (mean)</th></tr>{rows}</table>")
    return out


def _png_img(path: Path, alt: str) -> str:
    """An inline ``<img>`` of a PNG file, or nothing when the file is absent."""
    if not path.is_file():
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'


def transfer_section(heatmap_json: str | Path) -> str:
    """HTML for ``benchmarks/transfer_heatmap.py`` output: the IoU heatmap (the PNG beside the JSON) and chance."""
    import json

    path = Path(heatmap_json)
    res = json.loads(path.read_text())
    return (f"<h2>Transfer: value-neuron sets across tasks and layers</h2><p>IoU of the top {res['k']} of "
            f"{res['d']} neurons; chance IoU of two random sets {_fmt(res['chance_iou'])}.</p>"
            + _png_img(path.with_suffix(".png"), "IoU heatmap"))


def search_section(search_json: str | Path) -> str:
    """HTML for an ``rpe search`` result: accuracy, interval and tokens per problem of each method."""
    import json

    e = html.escape
    res = json.loads(Path(search_json).read_text())
    rows = "".join(
        f"<tr><td>{e(m)}</td><td>{r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]</td>"
        f"<td>{r['tokens_per_problem']:.0f}</td><td>{r['accuracy_per_1k_tokens']:.2f}</td></tr>"
        for m, r in res["methods"].items()
    )
    return (f"<h2>Step-level search ({res['n_problems']} problems, n = {res['config']['n']})</h2><table><tr>"
            f"<th>method</th><th>accuracy [95% CI]</th><th>tokens / problem</th><th>accuracy per 1k tokens</th></tr>"
            f"{rows}</table>")


def rollout_report(
    rollout_dir: str | Path, out: str | Path | None = None, n_examples: int = 6, bundle: str | Path | None = None
) -> Path:
    """Write ``report.html`` for a rollout folder (and, given ``bundle``, its value/dopamine results); return
    its path. The write is atomic: a failure never leaves a half-written report in place of a good one."""
    import json

    rollout_dir = Path(rollout_dir)
    trajectories = read_trajectories(rollout_dir)
    if not trajectories:
        raise ValueError(f"{rollout_dir} holds no trajectories")
    manifest = json.loads((rollout_dir / MANIFEST_FILE).read_text())
    out = Path(out) if out else rollout_dir / "report.html"
    e = html.escape
    lo, hi = manifest["accuracy_ci95"]
    rows = "".join(
        f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>"
        for k, v in (
            ("model", manifest["model"]["name"]),
            ("task", manifest["task"].get("name")),
            ("trajectories", manifest["n_trajectories"]),
            ("problems", manifest["n_problems"]),
            ("accuracy", f"{manifest['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f})"),
            ("mean steps", f"{manifest['mean_steps']:.2f}"),
            ("truncated", f"{manifest['truncated_fraction']:.3f}"),
            ("sampling", json.dumps(manifest["sampling"])),
        )
    )
    correct = [t for t in trajectories if t.reward >= 0.5][: n_examples // 2]
    wrong = [t for t in trajectories if t.reward < 0.5][: n_examples - len(correct)]
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>rpe rollouts: {e(str(rollout_dir))}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}} table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left}} .correct h4{{color:#1a7f37}}
.incorrect h4{{color:#b42318}} pre{{white-space:pre-wrap;margin:0}}</style></head><body>
<h1>Rollouts</h1>{report_card_section(bundle) if bundle else ""}<table>{rows}</table>
<h2>Steps per completion</h2><img alt="steps per completion" src="{_steps_plot(trajectories)}">
{bundle_section(bundle) if bundle else ""}
<h2>Example trajectories</h2>{''.join(_trajectory_html(t) for t in correct + wrong)}
</body></html>"""
    atomic_write_bytes(out, page.encode("utf-8"))
    return out
