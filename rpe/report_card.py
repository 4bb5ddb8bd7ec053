"""The report card: one row per claim of the paper, this project's measurement beside its control, the interval,
and a verdict in fixed words.

Verdicts:
- ``reproduced``: the measurement's interval excludes chance on the paper's side, and the comparison the claim
  makes holds with an interval that excludes no difference;
- ``not reproduced at this scale``: the interval excludes the paper's effect (or the control is significantly
  better), at the model and sample size stated;
- ``inconclusive``: the interval includes chance or no difference; the row says roughly what n would decide it.

Rows are built from result dictionaries (a bundle's ``metrics``, ``rpe dopamine``, ``rpe ablate``, ``rpe search``
and transfer results); a claim with no result gets ``not measured``. Nothing here measures anything.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rpe.metrics import n_to_decide

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced at this scale"
INCONCLUSIVE = "inconclusive"
NOT_MEASURED = "not measured"
MIN_SEARCH_PROBLEMS = 100
"""Fewer search problems than this cannot decide the search row (the paper's gain is 5.6 points)."""
PRESENT_NOT_SPECIFIC = "present but not specific"
"""A signal that is there, but random neuron sets of the same size carry as much of it."""


@dataclass
class CardRow:
    """One claim of the paper and what this project measured for it."""

    claim: str
    paper: str
    """What the paper reports."""
    measured: str
    """This project's number with its 95% interval and n."""
    control: str
    """The control measured in the same run, with its interval."""
    verdict: str
    note: str = ""
    """Why the verdict, or what n would decide it."""


def _iv(r: dict[str, Any], key: str = "auroc") -> str:
    point = r.get(key, r.get("diff", math.nan))
    return f"{point:.3f} [{r['low']:.3f}, {r['high']:.3f}]"


def _decide(r: dict[str, Any]) -> str:
    if not r["auroc"] > 0.5:  # an inverted noisy point: extrapolating its n would mislead
        return "the interval includes chance"
    need = n_to_decide(r["auroc"], r["low"], r["high"], int(r.get("n", 0)))
    return f"roughly {need} trajectories would decide it" if need else ""


def value_rows(m: dict[str, Any]) -> list[CardRow]:
    """Rows for the value-probe claims from a bundle's ``metrics`` (``rpe fit``)."""
    from rpe.fit import DENSE, DIFFICULTY, LOGPROB, QLEN, VALUE

    rows = []
    n = f"{m['n_trajectories']} trajectories, {m['folds']}-fold CV, layer {m['best_layer']}"
    s0 = m["headline_cv"]["s0"]
    v = s0[VALUE]
    controls = [c for c in (QLEN, LOGPROB, DIFFICULTY, DENSE) if c in s0]
    diffs = {c: s0[f"{VALUE} - {c}"] for c in controls}
    control_text = "; ".join(f"{c.split(' (')[0]} {_iv(s0[c])}, diff {_iv(diffs[c], 'diff')}" for c in controls)
    if v["verdict"] == "above chance":
        beaten = [c for c in controls if diffs[c]["verdict"] == "lower"]
        if beaten:
            verdict, note = NOT_REPRODUCED, f"value signal present, but {', '.join(c.split(' (')[0] for c in beaten)} rank(s) outcomes better"
        elif all(diffs[c]["verdict"] == "higher" for c in controls if c != DENSE):
            verdict, note = REPRODUCED, "above chance and above every baseline control"
        else:
            verdict, note = INCONCLUSIVE, "value signal present; its advantage over the controls is within noise"
    elif v["verdict"] == "below chance (inverted)":
        verdict, note = NOT_REPRODUCED, "inverted: the probe ranks outcomes the wrong way round"
    else:
        verdict, note = INCONCLUSIVE, _decide(v)
    rows.append(CardRow("value neurons know the outcome before reasoning (s_0)", "AUROC ~0.67 (0.59-0.73) vs all "
                        "neurons 0.60, question length 0.62", f"{_iv(v)} ({n})", control_text, verdict, note))

    f = m["headline_cv"]["final"]
    vf = f[VALUE]
    if vf["verdict"] == "above chance":  # the paper's level: the interval must reach 0.8
        verdict, note = (REPRODUCED, "") if vf["high"] >= 0.8 else (NOT_REPRODUCED, "above chance, but the interval lies below the paper's 0.8")
    elif "below" in vf["verdict"]:
        verdict, note = NOT_REPRODUCED, "inverted: the probe ranks outcomes the wrong way round"
    else:
        verdict, note = INCONCLUSIVE, _decide(vf)
    rows.append(CardRow("value at the final step", "AUROC mostly > 0.8", f"{_iv(vf)} ({n})",
                        f"all neurons {_iv(f[DENSE])}; question length {_iv(f[QLEN])}", verdict, note))

    rows.append(sparsity_row(m))

    beyond = m.get("beyond_difficulty") or {}
    if beyond:
        w = beyond["within_strata_s0"][VALUE]
        r = beyond["residualised_value_neurons"]["s0"]
        ok = w["verdict"] == "above chance" and r["verdict"] == "above chance"
        verdict = "present" if ok else "absent" if "below" in w["verdict"] else INCONCLUSIVE
        rows.append(CardRow("(beyond the paper) value neurons know more than difficulty at s_0", "not tested in the paper",
                            f"within difficulty strata {_iv(w)}; difficulty regressed out {_iv(r)}",
                            f"difficulty-only probe {_iv(s0[DIFFICULTY])}; prompt log-prob within strata "
                            f"{_iv(beyond['within_strata_s0'][LOGPROB])}" if DIFFICULTY in s0 else "",
                            verdict, "AUROC among problems of equal difficulty" if ok else _decide(w)))
    return rows


def _curve_text(m: dict[str, Any]) -> str:
    return "; ".join(f"{r['frac']:g}: {r['cv_auroc_s0']:.3f}/{r['cv_auroc_final']:.3f}" for r in m["pruning_curve"])


def sparsity_row(m: dict[str, Any]) -> CardRow:
    """Row for "a sparse 1% carries the value" from a bundle's ``metrics``: the value neurons minus all neurons
    (the headline's paired intervals) and, where the bundle has ``metrics["sparsity"]`` (:mod:`rpe.sparsity`),
    the same refit on random neuron sets of the same size (uniform and magnitude-matched draws).

    Judged at each position (s_0, final) where the value neurons are above chance, by :func:`sparsity_verdict`
    against each random control, the worse verdict counting; ``not reproduced`` at either position
    wins, then ``present but not specific``; ``reproduced`` needs every judged position. Without the random-set
    control the row cannot say ``reproduced`` (bundles fitted before it existed: re-run ``rpe fit``)."""
    from rpe.fit import DENSE, VALUE

    claim, paper = "a sparse 1% carries the value (against random sets of its size)", \
        "AUROC nearly flat when 80-99% of dimensions are removed"
    head = m["headline_cv"]
    vs_all = {p: head[p][f"{VALUE} - {DENSE}"] for p in ("s0", "final")}
    judged = [p for p in ("s0", "final") if head[p][VALUE]["verdict"] == "above chance"]
    measured = f"1% - all neurons: s_0 {_iv(vs_all['s0'], 'diff')}, final {_iv(vs_all['final'], 'diff')}"
    sp = m.get("sparsity")
    card = next((r for r in (sp or {}).get("rows", []) if r["method"] == "first_layer_norm"
                 and r["frac"] == sp.get("card_frac")), None)
    if card is None:
        control = f"curve (kept: s_0/final) {_curve_text(m)}; no random-set control in this bundle"
        if not judged:
            return CardRow(claim, paper, measured, control, INCONCLUSIVE, "the 1% probe is not distinguishable from chance")
        if any(vs_all[p]["verdict"] == "lower" for p in judged):
            return CardRow(claim, paper, measured, control, NOT_REPRODUCED,
                           "the 1% set loses signal against all neurons (paired interval below 0)")
        return CardRow(claim, paper, measured, control, INCONCLUSIVE,
                       "no random-set control (bundle fitted before it existed): re-run rpe fit")
    matched = sp.get("matched") or {}
    parts = []
    for p, name in (("s0", "s_0"), ("final", "final")):
        u = card["vs_random"][p]
        text = (f"{name}: {card['k']}-neuron random sets ({u['n_draws']} draws) {u['random_mean']:.3f}, selected "
                f"minus them {u['diff']:+.3f} [{u['low']:+.3f}, {u['high']:+.3f}], {u['rank']} of {u['n_draws']} "
                f"reach it")
        if p in matched:
            mm = matched[p]
            text += f"; magnitude-matched {mm['random_mean']:.3f}, minus them {mm['diff']:+.3f} [{mm['low']:+.3f}, {mm['high']:+.3f}]"
        parts.append(text)
    control = "; ".join(parts) + f" (same logistic refit for every set); curve (kept: s_0/final) {_curve_text(m)}"
    if not judged:
        return CardRow(claim, paper, measured, control, INCONCLUSIVE, "the 1% probe is not distinguishable from chance")
    order = (NOT_REPRODUCED, PRESENT_NOT_SPECIFIC, REPRODUCED)  # worst first: the harder control decides
    verdicts = {p: min((_control_verdict(vs_all[p], c) for c in [card["vs_random"][p]] + ([matched[p]] if p in matched else [])),
                       key=order.index) for p in judged}
    where = ", ".join({"s0": "s_0", "final": "final"}[p] for p in judged)
    if NOT_REPRODUCED in verdicts.values():
        lost = [{"s0": "s_0", "final": "final"}[p] for p, v in verdicts.items() if v == NOT_REPRODUCED]
        return CardRow(claim, paper, measured, control, NOT_REPRODUCED,
                       f"the 1% set loses signal against all neurons at {', '.join(lost)}{_where_it_holds(sp, judged)}")
    if PRESENT_NOT_SPECIFIC in verdicts.values():
        return CardRow(claim, paper, measured, control, PRESENT_NOT_SPECIFIC,
                       f"within noise of all neurons at {where}, but random sets of its size do not do significantly "
                       "worse (paired interval above 0 and their 95th percentile beaten)")
    return CardRow(claim, paper, measured, control, REPRODUCED,
                   f"within noise of all neurons and above random sets of its size at {where}")


def _control_verdict(vs_all: dict[str, Any], vs_random: dict[str, Any]) -> str:
    """:func:`sparsity_verdict` of a paired difference against all neurons (``low``/``high``) and a
    :class:`rpe.sparsity.RandomSetComparison` as a dict."""
    return sparsity_verdict((vs_all["low"], vs_all["high"]), (vs_random["low"], vs_random["high"]),
                            beats_q95=vs_random["selected"] > vs_random["random_q95"])


def _where_it_holds(sp: dict[str, Any], judged: Sequence[str]) -> str:
    """``"; at s_0 it holds from 5% kept ..."``: per judged position, the smallest fraction above the card's
    whose first-layer-norm set (the control's own refit) is within noise of all neurons and above its random
    sets; empty when none is."""
    parts = []
    for p, name in (("s0", "s_0"), ("final", "the final state")):
        ok = [r["frac"] for r in sp["rows"] if r["method"] == "first_layer_norm" and p in judged
              and r["frac"] > sp.get("card_frac", 0.0) and _control_verdict(r["vs_all"][p], r["vs_random"][p]) == REPRODUCED]
        if ok:
            parts.append(f"at {name} it holds from {min(ok) * 100:g}% kept")
    return ("; " + " and ".join(parts) + " (within noise of all neurons and above random sets of that size)") if parts else ""


def ablation_row(res: dict[str, Any] | None) -> CardRow:
    """Row for zeroing value neurons vs controls, from ``rpe ablate``'s ``results.json`` or a summary with keys
    ``n``, ``baseline``, ``value``, ``random`` (accuracies) and their Wilson intervals ``*_ci``."""
    paper = "zeroing 1% at layers 2-5 drops MATH500 accuracy 54.9 points; random 1% -0.6"
    if not res:
        return CardRow("zeroing value neurons destroys reasoning", paper, "-", "-", NOT_MEASURED)
    drop_v = res["baseline"] - res["value"]
    drop_r = res["baseline"] - res["random"]
    lo, hi = res["value_ci"]
    blo, bhi = res["baseline_ci"]
    separated = hi < blo
    verdict = REPRODUCED if separated and drop_v > drop_r + 0.05 else NOT_REPRODUCED if lo <= res["baseline"] <= hi and hi - lo < 0.2 else INCONCLUSIVE
    return CardRow("zeroing value neurons destroys reasoning", paper,
                   f"accuracy {res['value']:.3f} [{lo:.3f}, {hi:.3f}] vs none {res['baseline']:.3f} [{blo:.3f}, {bhi:.3f}] "
                   f"(n = {res['n']} per arm, {res.get('where', '')})",
                   "; ".join(x for x in (f"random {res['random']:.3f}" if not math.isnan(res["random"]) else "",
                                         res.get("controls", "")) if x), verdict,
                   res.get("note", "a drop of the paper's size would be far outside these intervals"))


def ablation_summary(results: dict[str, Any], layer: int | str | None = None) -> dict[str, Any]:
    """The input of :func:`ablation_row` from ``rpe ablate``'s ``results.json`` (one layer: the given one or the
    first)."""
    layers = results["layers"]
    key = str(layer) if layer is not None else next(iter(layers))
    summary = layers[key]["summary"]
    base = results["baseline"]
    others = "; ".join(f"{src} {s['accuracy']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"
                       for src, s in summary.items() if src not in ("value", "random"))
    rnd = summary.get("random", {"accuracy": math.nan})
    return {"n": results.get("n_problems", base.get("n")), "baseline": base["accuracy"], "baseline_ci": base["ci95"],
            "value": summary["value"]["accuracy"], "value_ci": summary["value"]["ci95"], "random": rnd["accuracy"],
            "controls": others, "where": f"{results['n_neurons']} neurons zeroed at layer {key}"}


def dopamine_row(d: dict[str, Any] | None) -> CardRow:
    """Row for dopamine neurons from a bundle's ``metrics["dopamine"]`` (``rpe dopamine``): reproduced only when, on
    >= 300 surprising steps, the held-out Spearman's interval excludes 0, its permutation p-value is below 0.05 and
    it beats the random sets' 95th percentile."""
    claim, paper = "dopamine neurons encode RPE with its sign", "Spearman ~0.3-0.4"
    if not d:
        return CardRow(claim, paper, "-", "-", NOT_MEASURED)
    powered = d["n_surprising"] >= 300
    beats = d["test_spearman_dopamine"] > d["test_spearman_random_q95"]
    rho = d["test_spearman_dopamine"]
    if "test_spearman_low" in d:  # bundles from before the interval and p-value were added have neither
        low, high, p = d["test_spearman_low"], d["test_spearman_high"], d["test_permutation_p"]
        measured = (f"held-out Spearman {rho:.3f} [{low:.3f}, {high:.3f}], permutation p = {p:.3g} "
                    f"({d['n_surprising']} surprising steps, {d['n_test']} held out)")
        significant = low > 0 and p < 0.05
    else:
        measured, significant = f"held-out Spearman {rho:.3f} ({d['n_surprising']} surprising steps)", False
    control = f"random neurons mean {d['test_spearman_random_mean']:.3f}, 95th pct {d['test_spearman_random_q95']:.3f}"
    if not powered:
        return CardRow(claim, paper, measured, control, INCONCLUSIVE,
                       f"only {d['n_surprising']} surprising steps; >= 300 needed for power")
    if significant and beats:
        return CardRow(claim, paper, measured, control, REPRODUCED)
    note = ("the interval includes 0: not distinguishable from chance" if not significant
            else "no better than random neuron sets of the same size")
    return CardRow(claim, paper, measured, control, NOT_REPRODUCED, note)


def search_row(res: dict[str, Any] | None, paper_gain: float = 0.056) -> CardRow:
    """Row for value-guided step-level search from ``rpe search`` results holding the ``value``, ``random`` and
    ``greedy`` methods on the same problems: value minus random pick and value minus greedy, paired over problems.
    Reproduced when value beats both (intervals above 0); not reproduced when the paper's gain (``paper_gain``,
    77.8 vs 72.2) lies above either interval; otherwise inconclusive."""
    from rpe.metrics import paired_difference

    claim, paper = "step-level search by internal value", "77.8% vs greedy 72.2, random 72.2"
    methods = (res or {}).get("methods", {})
    if not all(m in methods for m in ("value", "random", "greedy")):
        return CardRow(claim, paper, "-", "-", NOT_MEASURED)
    v, r, g = (methods[m] for m in ("value", "random", "greedy"))
    n = res.get("n_problems", len(v["correct"]))
    if n < MIN_SEARCH_PROBLEMS:  # a bootstrap over a handful of problems is no interval (often [0, 0])
        return CardRow(claim, paper, f"{v['accuracy']:.3f} ({n} problems)", f"random pick {r['accuracy']:.3f}; greedy "
                       f"{g['accuracy']:.3f}", INCONCLUSIVE, f"only {n} problems; >= {MIN_SEARCH_PROBLEMS} needed to decide")
    dr = paired_difference(v["correct"], r["correct"])
    dg = paired_difference(v["correct"], g["correct"])
    measured = (f"{v['accuracy']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] ({res['n_problems']} problems, "
                f"{res['config']['n']} candidates per step)")
    control = (f"random pick {r['accuracy']:.3f}, diff {dr[0]:+.3f} [{dr[1]:+.3f}, {dr[2]:+.3f}]; greedy "
               f"{g['accuracy']:.3f}, diff {dg[0]:+.3f} [{dg[1]:+.3f}, {dg[2]:+.3f}]")
    if dr[1] > 0 and dg[1] > 0:
        return CardRow(claim, paper, measured, control, REPRODUCED)
    if dr[2] < paper_gain or dg[2] < paper_gain:
        worse = [name for name, d in (("the random pick", dr), ("greedy", dg)) if d[2] < paper_gain]
        return CardRow(claim, paper, measured, control, NOT_REPRODUCED,
                       f"the paper's +{100 * paper_gain:.1f} points over {' and '.join(worse)} lies above the interval")
    return CardRow(claim, paper, measured, control, INCONCLUSIVE)


def generic_row(claim: str, paper: str, res: dict[str, Any] | None) -> CardRow:
    """Row from a summary dict with ``measured``, ``control``, ``verdict`` and optional ``note`` (texts written
    by the script that ran the experiment)."""
    if not res:
        return CardRow(claim, paper, "-", "-", NOT_MEASURED)
    return CardRow(claim, paper, res["measured"], res["control"], res["verdict"], res.get("note", ""))


def sparsity_verdict(vs_all: tuple[float, float], vs_random: tuple[float, float], tolerance: float = 0.02,
                     beats_q95: bool = True) -> str:
    """The card's words for "a sparse set carries the value", from two paired 95% intervals of AUROC
    differences: ``vs_all`` (selected minus all neurons) and ``vs_random`` (selected minus random sets' mean),
    and whether the selected set beats the random sets' 95th percentile (``beats_q95``; the dopamine row asks
    the same of its random sets).

    - ``reproduced``: within noise of all neurons (the interval reaches above ``-tolerance``) and above random
      sets (its interval above 0, and above their 95th percentile);
    - ``present but not specific``: within noise of all neurons, but random sets of its size do as well;
    - ``not reproduced at this scale``: clearly below all neurons.

    Example:
        >>> sparsity_verdict((-0.03, 0.01), (0.02, 0.08))
        'reproduced'
        >>> sparsity_verdict((-0.03, 0.01), (-0.01, 0.03))
        'present but not specific'
        >>> sparsity_verdict((-0.14, -0.08), (0.02, 0.08))
        'not reproduced at this scale'
    """
    near_all = vs_all[1] >= -tolerance
    if not near_all:
        return NOT_REPRODUCED
    return REPRODUCED if vs_random[0] > 0 and beats_q95 else PRESENT_NOT_SPECIFIC


def card_rows(metrics: dict[str, Any], *, ablation: dict[str, Any] | None = None,
              search: dict[str, Any] | None = None, include_unmeasured: bool = True) -> list[CardRow]:
    """Every row one run measured, in the card's order: the value rows and the dopamine row of a bundle's
    ``metrics`` (always listed, measured or not), ``rpe ablate``'s ``results.json`` read at the bundle's layer,
    and ``rpe search``'s results. ``include_unmeasured``: the ablation and search rows are listed (``not
    measured``) when their results are not given."""
    rows = value_rows(metrics) if "headline_cv" in metrics else []
    layer = metrics.get("best_layer")
    if ablation and str(layer) not in ablation.get("layers", {}):
        layer = None  # ablated elsewhere only: the first layer it ran at
    if ablation or include_unmeasured:
        rows.append(ablation_row(ablation_summary(ablation, layer=layer) if ablation else None))
    rows.append(dopamine_row(metrics.get("dopamine")))
    if search or include_unmeasured:
        rows.append(search_row(search))
    return rows


def markdown(rows: list[CardRow]) -> str:
    """The card as a Markdown table."""
    out = ["| claim (Xu et al., arXiv 2602.00986) | paper | measured here (95% CI) | control, same run | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        verdict = f"**{r.verdict}**" + (f": {r.note}" if r.note else "")
        out.append(f"| {r.claim} | {r.paper} | {r.measured} | {r.control} | {verdict} |")
    return "\n".join(out)


def to_html(rows: list[CardRow]) -> str:
    """The card as an HTML table (every text escaped)."""
    e = html.escape
    body = "".join(
        f"<tr><td>{e(r.claim)}</td><td>{e(r.paper)}</td><td>{e(r.measured)}</td><td>{e(r.control)}</td>"
        f"<td><b>{e(r.verdict)}</b>{(': ' + e(r.note)) if r.note else ''}</td></tr>"
        for r in rows
    )
    return ("<h2>Report card</h2><table><tr><th>claim (Xu et al., arXiv 2602.00986)</th><th>paper</th><th>measured here (95% CI)</th>"
            "<th>control, same run</th><th>verdict</th></tr>" + body + "</table>")


__all__ = ["CardRow", "INCONCLUSIVE", "NOT_MEASURED", "NOT_REPRODUCED", "PRESENT_NOT_SPECIFIC", "REPRODUCED", "ablation_row",
           "ablation_summary", "card_rows",
           "dopamine_row", "generic_row", "search_row",
           "markdown", "sparsity_row", "sparsity_verdict", "to_html", "value_rows"]
