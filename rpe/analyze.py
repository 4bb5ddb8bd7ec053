"""Offline RPE analysis of rollouts: per-step internal value, RPE and dopamine activity, confidence before
answering, and a self-contained HTML report.

Inputs: an ``rpe rollouts`` folder, or rollouts made elsewhere (:func:`import_rollouts`):

- JSONL (one object per line), Parquet or CSV with the fields ``prompt`` (the exact model input text, chat
  template applied), either ``steps`` (list of step texts, joined with blank lines) or ``completion`` (split
  with the segmenter), and ``reward`` (1 correct, 0 wrong; the column name is configurable). Optional:
  ``problem_id`` (samples of one problem share it; default: the prompt), ``id``.
- TRL's logged completions table (``prompt``, ``completion`` and a reward column such as ``correct``) is the
  same format: pass ``reward_column``.

Outputs (:func:`analyze_rollouts`): ``steps.parquet`` (one row per state: trajectory, step, value, RPE,
dopamine, reward, step text), ``confidence.json``, ``selective.json`` (risk-coverage and AURC, when both outcomes
occur) and ``report.html``; every file is written atomically.
"""

from __future__ import annotations

import functools
import html
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rpe.metrics import bootstrap_auroc, chance_verdict, difference_verdict
from rpe.records import SCHEMA_VERSION, Trajectory, atomic_write_bytes, atomic_write_json, read_trajectories
from rpe.rollouts import make_steps

logger = logging.getLogger(__name__)

STEP_COLUMNS = ("trajectory_id", "problem_id", "step", "n_steps", "value", "rpe", "dopamine", "reward", "text")


class RolloutImportError(ValueError):
    """A rollout file from another tool that cannot be read; the message names the record and field."""


# -- import ---------------------------------------------------------------------------------------------
def _records(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        from rpe.jsonl import iter_jsonl_objects

        return [{**rec, "_where": where} for where, rec in iter_jsonl_objects(path, RolloutImportError)]
    if path.suffix in (".parquet", ".csv"):
        import pandas as pd

        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        recs = frame.to_dict("records")
        for i, r in enumerate(recs):
            r["_where"] = f"{path} row {i}"
        return recs
    raise RolloutImportError(f"{path}: expected an rpe rollout folder, or a .jsonl, .parquet or .csv file")


def import_rollouts(path: str | Path, tokenizer, *, reward_column: str = "reward", segmenter: str = "paragraph",
                    encode_prompt: Callable[[str], list[int]] | None = None) -> list[Trajectory]:
    """Trajectories from an ``rpe rollouts`` folder or another tool's file (see the module docstring).

    ``encode_prompt`` tokenises a file's prompt texts (default: without special tokens; the report passes the
    bundle's :meth:`~rpe.bundle.SubsystemBundle.encode_text`, so prompts get the BOS its fitted prompts had).

    Raises:
        RolloutImportError: empty input, a missing field (named with the record), or ``steps`` that do not
            survive re-segmentation of the joined text (a step holding a blank line).
    """
    path = Path(path)
    if path.is_dir():
        trajs = read_trajectories(path)
        if not trajs:
            raise RolloutImportError(f"{path} holds no trajectories")
        return trajs
    if not path.exists():
        raise RolloutImportError(f"{path} does not exist")
    recs = _records(path)
    if not recs:
        raise RolloutImportError(f"{path} holds no records")
    out = []
    for i, rec in enumerate(recs):
        where = rec.pop("_where")
        for name in ("prompt", reward_column):
            if name not in rec or rec[name] is None or (isinstance(rec[name], float) and math.isnan(rec[name])):
                raise RolloutImportError(f"{where}: missing field {name!r}")
        steps_given = rec.get("steps")
        if steps_given is not None and not isinstance(steps_given, str):
            steps_list = [str(s) for s in list(steps_given)]
            completion = "\n\n".join(steps_list)
        elif "completion" in rec and rec["completion"] is not None:
            steps_list, completion = None, str(rec["completion"])
        else:
            raise RolloutImportError(f"{where}: missing field 'steps' (list of step texts) or 'completion'")
        try:
            reward = float(rec[reward_column])
        except (TypeError, ValueError) as err:
            raise RolloutImportError(f"{where}: field {reward_column!r} is not a number: {rec[reward_column]!r}") from err
        prompt = str(rec["prompt"])
        p_ids = encode_prompt(prompt) if encode_prompt else tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not p_ids:
            raise RolloutImportError(f"{where}: field 'prompt' is empty")
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        steps = make_steps(tokenizer, c_ids, completion, segmenter, None)
        if steps_list is not None and [s.text for s in steps] != [s.strip() for s in steps_list if s.strip()]:
            raise RolloutImportError(
                f"{where}: the steps do not match the text: {len(steps_list)} steps given, {len(steps)} found when "
                "the joined text is split again (a step may contain a blank line)"
            )
        pid = str(rec.get("problem_id", prompt))
        out.append(Trajectory(
            schema_version=SCHEMA_VERSION, trajectory_id=str(rec.get("id", f"{path.stem}/{i}")), problem_id=pid,
            task=str(rec.get("task", "imported")), sample_index=0, prompt=prompt, completion=completion, steps=steps,
            final_answer=None, reference_answer=str(rec.get("answer", "")), reward=reward, prompt_token_ids=list(p_ids),
            completion_token_ids=list(c_ids), finish_reason="eos", truncated=False, prompt_truncated=False, model={},
            sampling={}, seed=0,
        ))
    return out


# -- per-step signals -----------------------------------------------------------------------------------
def step_table(model, tokenizer, bundle, trajectories: Sequence[Trajectory], *, batch_size: int = 16,
               progress: Callable[[int, int], None] | None = None, reader=None) -> dict[str, list]:
    """Columns :data:`STEP_COLUMNS`, one row per state s_0..s_T of every trajectory (rpe/dopamine NaN at s_0).

    The trajectories' own step spans are used (one hooked forward per batch, bundle layer only)."""
    from rpe.signals import SignalReader

    reader = reader or SignalReader(bundle, model, tokenizer, batch_size=batch_size)
    cols: dict[str, list] = {c: [] for c in STEP_COLUMNS}
    for start in range(0, len(trajectories), batch_size):
        batch = trajectories[start : start + batch_size]
        sigs = reader.read([t.prompt_token_ids for t in batch], [t.completion_token_ids for t in batch],
                           spans=[[(s.token_start, s.token_end) for s in t.steps] for t in batch])
        for t, s in zip(batch, sigs):
            for k in range(s.n_steps + 1):
                cols["trajectory_id"].append(t.trajectory_id)
                cols["problem_id"].append(t.problem_id)
                cols["step"].append(k)
                cols["n_steps"].append(s.n_steps)
                cols["value"].append(float(s.values[k]))
                cols["rpe"].append(float(s.rpe[k - 1]) if k else float("nan"))
                cols["dopamine"].append(float(s.dopamine[k - 1]) if k and s.dopamine.size else float("nan"))
                cols["reward"].append(float(t.reward))
                cols["text"].append(t.steps[k - 1].text if k else "")
        if progress:
            progress(min(start + batch_size, len(trajectories)), len(trajectories))
    return cols


# -- confidence before answering ------------------------------------------------------------------------
def _entropy_by_problem(answers: dict[str, list[str]]) -> dict[str, float]:
    out = {}
    for pid, a in answers.items():
        if len(a) < 2:
            continue
        p = np.array(list(Counter(a).values()), dtype=float) / len(a)
        out[pid] = float(-(p * np.log(p)).sum())
    return out


def answer_entropy(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Per problem: entropy (nats) of the final answers over its samples (needs >= 2 samples per problem)."""
    answers: dict[str, list[str]] = defaultdict(list)
    for t in trajectories:
        answers[t.problem_id].append(str(t.final_answer))
    return _entropy_by_problem(answers)


@dataclass
class ConfidenceInputs:
    """Per-trajectory numbers the confidence table needs, collected batch by batch (nothing else is kept)."""

    y: list[float] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    value_s0: list[float] = field(default_factory=list)
    value_final: list[float] = field(default_factory=list)
    question_length: list[float] = field(default_factory=list)
    prompt_logprob: list[float] = field(default_factory=list)
    answers: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    difficulty: list[dict[str, float]] = field(default_factory=list)
    """The task's difficulty features of each trajectory's problem (``{}`` where the task names none)."""

    def add(self, model, tokenizer, trajectories: Sequence[Trajectory], table: dict[str, list],
            difficulty: dict[str, dict[str, float]] | None = None) -> None:
        """Append ``trajectories`` (their step ``table`` rows; ``difficulty``: problem id -> features)."""
        from rpe.baselines import mean_prompt_logprob

        rows = list(zip(table["trajectory_id"], table["step"], table["n_steps"], table["value"]))
        s0 = {tid: v for tid, k, _, v in rows if k == 0}
        final = {tid: v for tid, k, n, v in rows if k == n}
        for t in trajectories:
            self.y.append(float(t.reward >= 0.5))
            self.groups.append(t.problem_id)
            self.value_s0.append(s0[t.trajectory_id])
            self.value_final.append(final[t.trajectory_id])
            self.question_length.append(float(t.prompt_len))
            self.answers[t.problem_id].append(str(t.final_answer))
            self.difficulty.append((difficulty or {}).get(t.problem_id) or {})
        self.prompt_logprob += mean_prompt_logprob(model, trajectories, pad_token_id=tokenizer.pad_token_id or 0).tolist()


def confidence(inputs: ConfidenceInputs, *, n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    """AUROC (95% bootstrap over problems) of confidence signals available before answering, same run:
    the value-neuron probe V(s_0), question length (shorter = more confident), mean prompt log-prob and,
    with several samples per problem, minus the answer entropy (a baseline that needs the samples)."""
    y = np.array(inputs.y)
    groups = np.array(inputs.groups)
    scores = {
        "value neurons V(s_0)": np.array(inputs.value_s0),
        "question length (shorter = more confident)": -np.array(inputs.question_length),
        "mean prompt log-prob": np.array(inputs.prompt_logprob),
    }
    ent = _entropy_by_problem(inputs.answers)
    if ent:
        scores["minus answer entropy over samples"] = np.array([-ent.get(g, np.nan) for g in inputs.groups])
    out = {}
    for name, sc in scores.items():
        ok = ~np.isnan(sc)
        if len(set(y[ok])) < 2:
            out[name] = {"auroc": float("nan"), "low": float("nan"), "high": float("nan"), "n": int(ok.sum())}
            continue
        a, lo, hi = bootstrap_auroc(y[ok], sc[ok], groups=groups[ok], n_boot=n_boot, seed=seed)
        out[name] = {"auroc": a, "low": lo, "high": hi, "n": int(ok.sum())}
    return out


SELECTIVE_BASELINE = "question length (shorter = more confident)"
DIFFICULTY_SIGNAL = "the task's difficulty alone (cross-fitted)"


def selective_answering(inputs: ConfidenceInputs, *, n_boot: int = 1000, seed: int = 0,
                        curve_points: int = 200) -> dict[str, Any]:
    """Selective answering: answer only the questions a signal is most confident about. Risk-coverage curves and
    AURC (lower = fewer errors at equal coverage; 95% bootstrap over problems) of V(s_0) and V(final) against
    question length, mean prompt log-prob, with several samples of every problem minus the answer entropy, and,
    where the task names its difficulty, a logistic regression on the difficulty features alone (cross-fitted
    over 5 folds of problems: no trajectory is scored by a fit that saw its problem); each signal's AURC minus
    question length's from the same resamples, and an uninformative signal's AURC (1 - accuracy). V(final) is
    read after the answer is written: it selects among generated answers, V(s_0) before any token is generated.

    Returns:
        ``{"aurc": {name: {"aurc", "low", "high", "n", "minus_baseline"?}}, "baseline": name,
        "curves": {name: {"coverage": [...], "accuracy": [...]}}}`` (curves thinned to ``curve_points``).
    """
    from rpe.metrics import bootstrap_aurc, selective_accuracy

    y = np.array(inputs.y)
    scores = {
        "value neurons V(s_0)": np.array(inputs.value_s0),
        "value neurons V(final), after the answer": np.array(inputs.value_final),
        SELECTIVE_BASELINE: -np.array(inputs.question_length),
        "mean prompt log-prob": np.array(inputs.prompt_logprob),
    }
    ent = _entropy_by_problem(inputs.answers)
    if ent and all(g in ent for g in inputs.groups):
        scores["minus answer entropy over samples"] = np.array([-ent[g] for g in inputs.groups])
    if inputs.difficulty and any(inputs.difficulty):
        from rpe.crossval import kfold_by_problem
        from rpe.difficulty import difficulty_features, difficulty_only_values

        features, _ = difficulty_features(inputs.difficulty, np.array(inputs.question_length))
        scores[DIFFICULTY_SIGNAL] = difficulty_only_values(features, y, kfold_by_problem(inputs.groups, 5, seed))
    result = bootstrap_aurc(y, scores, groups=np.array(inputs.groups), baseline=SELECTIVE_BASELINE, n_boot=n_boot,
                            seed=seed)
    curves = {}
    for name, sc in scores.items():
        cov, acc = selective_accuracy(y, sc)
        keep = np.unique(np.linspace(0, len(cov) - 1, min(curve_points, len(cov))).round().astype(int))
        curves[name] = {"coverage": cov[keep].tolist(), "accuracy": acc[keep].tolist()}
    return {"aurc": result, "baseline": SELECTIVE_BASELINE, "curves": curves}


# -- report -----------------------------------------------------------------------------------------------
OUTCOME_COLORS = (("correct", True, "#1a7f37"), ("incorrect", False, "#b42318"))
MIN_POINT = 5  # a state index, bin or curve point drawn only with at least this many trajectories behind it


def _mean_band(values: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """Mean of ``values`` and its 95% interval from a bootstrap over whole ``groups`` (problems)."""
    from rpe.metrics import cluster_resamples

    means = [values[idx].mean() for idx in cluster_resamples(groups, n_boot, seed)]
    low, high = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


def _value_axes(ax, position: np.ndarray, value: np.ndarray, correct: np.ndarray, groups: np.ndarray, xlabel: str,
                n_boot: int) -> None:
    for label, want, color in OUTCOME_COLORS:
        pts = []
        for k in sorted(set(position[correct == want])):
            sel = (correct == want) & (position == k)
            if sel.sum() >= MIN_POINT:
                pts.append((k, *_mean_band(value[sel], groups[sel], n_boot, seed=abs(int(k)))))
        if pts:
            ks, mean, lo, hi = map(np.array, zip(*pts))
            ax.plot(ks, mean, marker="o", color=color, label=f"{label} (n = {int((correct == want).sum())} states)")
            ax.fill_between(ks, lo, hi, color=color, alpha=0.18, lw=0)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # states are whole steps
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)


def _calibration_axes(ax, v: np.ndarray, y: np.ndarray, where: str) -> None:
    """Equal-count bins of V (as many as keep >= 20 trajectories per bin, at most 10), each bin's fraction
    correct with its Wilson 95% interval; the bin size and the ECE in the title."""
    from rpe.metrics import ece, wilson_interval

    n_bins = int(min(10, max(1, len(v) // 20)))
    order = np.argsort(v, kind="stable")
    chunks = [c for c in np.array_split(order, n_bins) if len(c) >= MIN_POINT]
    for chunk in chunks:
        x, frac = v[chunk].mean(), y[chunk].mean()
        lo, hi = wilson_interval(y[chunk].sum(), len(chunk))
        ax.errorbar([x], [frac], yerr=[[frac - lo], [hi - frac]], marker="o", color="#1f4e9e", capsize=3)
    low, high = min(0.0, float(v.min())), max(1.0, float(v.max()))
    ax.plot([low, high], [low, high], color="grey", ls="--", lw=0.8, label="perfectly calibrated")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(f"internal value at {where}")
    sizes = sorted({len(c) for c in chunks})
    if not sizes:
        ax.set_title(f"{where}: {len(v)} trajectories, too few for a bin of {MIN_POINT}", fontsize=9)
    else:
        size = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        ax.set_title(f"{where}: {len(chunks)} bins of {size} trajectories, ECE {ece(y, np.clip(v, 0, 1)):.3f}",
                     fontsize=9)
    ax.grid(alpha=0.3)


def _plots(table: dict[str, list], selective: dict[str, Any] | None = None, *, n_boot: int = 200) -> dict[str, str]:
    """The report's figures as PNG data URLs: ``value`` (mean V by state from the start and from the end, per
    outcome, 95% bands over problems), ``rpe`` (histograms), ``calibration`` (s_0 and final, equal-count bins with
    Wilson intervals and counts) and, with ``selective``, ``risk_coverage``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rpe.report import png_bytes

    step = np.array(table["step"])
    n_steps = np.array(table["n_steps"])
    value = np.array(table["value"], dtype=float)
    rpe = np.array(table["rpe"], dtype=float)
    correct = np.array(table["reward"]) >= 0.5
    groups = np.array(table["problem_id"])
    out = {}
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.4), sharey=True)
    _value_axes(left, step, value, correct, groups, "state from the start (0 = before the first step)", n_boot)
    _value_axes(right, step - n_steps, value, correct, groups, "state from the end (0 = after the last step)", n_boot)
    left.set_ylabel("internal value V")
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=8)
    fig.suptitle(f"Internal value over reasoning steps, by outcome (mean, 95% band over problems; states with "
                 f"< {MIN_POINT} trajectories left out)", fontsize=10)
    fig.tight_layout()
    out["value"] = png_bytes(fig)
    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    for label, want, color in OUTCOME_COLORS:
        r = rpe[(correct == want) & ~np.isnan(rpe)]
        if r.size:
            ax.hist(r, bins=30, alpha=0.5, color=color, label=f"{label} ({r.size} steps)", density=True)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel("internal RPE of a step, V(s_t) - V(s_t-1)")
    ax.set_ylabel("density")
    ax.set_title("Internal RPE by outcome", fontsize=10)
    ax.legend(fontsize=8)
    out["rpe"] = png_bytes(fig)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.4), sharey=True)
    y = correct.astype(float)
    _calibration_axes(left, value[step == 0], y[step == 0], "s_0")
    final = step == n_steps
    _calibration_axes(right, value[final], y[final], "the final state")
    left.set_ylabel("fraction correct (95% Wilson)")
    left.legend(fontsize=8, loc="upper left")
    fig.suptitle("Calibration of internal value (equal-count bins, fraction correct with 95% Wilson intervals)",
                 fontsize=10)
    fig.tight_layout()
    out["calibration"] = png_bytes(fig)
    if selective:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for name, curve in selective["curves"].items():
            cov, acc = np.array(curve["coverage"]), np.array(curve["accuracy"])
            a = selective["aurc"][name]
            keep = cov * a["n"] >= MIN_POINT  # the first few answered say little
            ax.plot(cov[keep], acc[keep], lw=1.6 if name.startswith("value") else 1.0,
                    label=f"{name}: AURC {a['aurc']:.3f} [{a['low']:.3f}, {a['high']:.3f}]")
        rnd = selective["aurc"]["random"]
        ax.axhline(1 - rnd["aurc"], color="grey", ls="--", lw=0.8, label=f"answer everything ({1 - rnd['aurc']:.3f})")
        ax.set_xlabel("coverage (share of questions answered, most confident first)")
        ax.set_ylabel("accuracy of the answered")
        ax.set_title("Selective answering: risk-coverage (AURC, 95% over problems)", fontsize=10)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
        out["risk_coverage"] = png_bytes(fig)
    return out


def _trajectory_card(rows: list[int], table: dict[str, list]) -> str:
    e = html.escape
    cells = []
    for i in rows:
        r = table["rpe"][i]
        rpe_cell = "" if math.isnan(r) else f"{r:+.3f}"
        text = e(table["text"][i]) if table["step"][i] else "<em>(prompt)</em>"
        cells.append(f"<tr><td>{table['step'][i]}</td><td>{table['value'][i]:.3f}</td><td>{rpe_cell}</td>"
                     f"<td><pre>{text}</pre></td></tr>")
    i0 = rows[0]
    verdict = "correct" if table["reward"][i0] >= 0.5 else "incorrect"
    return (f'<div class="traj {verdict}"><h4>{e(table["trajectory_id"][i0])} · {verdict}</h4>'
            f"<table><tr><th>state</th><th>V</th><th>RPE</th><th>step text</th></tr>{''.join(cells)}</table></div>")


def render_report(table: dict[str, list], conf: dict[str, dict[str, float]], *, title: str,
                  bundle_dir: str | Path | None = None, extra_sections: Sequence[str] = (), n_examples: int = 4,
                  n_surprises: int = 8, card_results: dict[str, dict] | None = None,
                  selective: dict[str, Any] | None = None) -> str:
    """The HTML page (self-contained; every model text escaped). ``card_results``: ``rpe ablate``'s and ``rpe
    search``'s results (keys ``ablation``, ``search``) whose rows join the report card; ``selective``:
    :func:`selective_answering`'s result (the risk-coverage section)."""
    e = html.escape
    plots = _plots(table, selective)
    by_traj: dict[str, list[int]] = defaultdict(list)
    for i, tid in enumerate(table["trajectory_id"]):
        by_traj[tid].append(i)
    correct = [r for r in by_traj.values() if table["reward"][r[0]] >= 0.5][: n_examples // 2]
    wrong = [r for r in by_traj.values() if table["reward"][r[0]] < 0.5][: n_examples - len(correct)]
    rpe = np.array(table["rpe"])
    order = np.argsort(-np.nan_to_num(np.abs(rpe), nan=-1))[:n_surprises]
    surprises = "".join(
        f"<tr><td>{e(table['trajectory_id'][i])}</td><td>{table['step'][i]}</td><td>{rpe[i]:+.3f}</td>"
        f"<td>{'correct' if table['reward'][i] >= 0.5 else 'incorrect'}</td><td><pre>{e(table['text'][i])}</pre></td></tr>"
        for i in order if not math.isnan(rpe[i])
    )
    conf_rows = "".join(
        f"<tr><td>{e(name)}</td><td>{v['auroc']:.3f} [{v['low']:.3f}, {v['high']:.3f}]</td>"
        f"<td>{e(chance_verdict(v['low'], v['high']))}</td><td>{v['n']}</td></tr>"
        for name, v in conf.items()
    )
    final = [i for i, (k, n) in enumerate(zip(table["step"], table["n_steps"])) if k == n]
    groups = np.array([str(t).rsplit("#", 1)[0] for t in table["trajectory_id"]])[final]  # problem of each trajectory
    auc_final = bootstrap_auroc(np.array(table["reward"])[final] >= 0.5, np.array(table["value"])[final], groups=groups,
                                n_boot=500)
    selective_html = ""
    if selective:
        base = selective["baseline"]

        def minus(v: dict) -> str:
            d = v.get("minus_baseline")
            if not d:
                return "<td>(the baseline)</td>"
            reading = difference_verdict(d["low"], d["high"]).replace("higher", "more errors").replace("lower", "fewer errors")
            return f"<td>{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}], {e(reading)}</td>"

        srows = "".join(f"<tr><td>{e(name)}</td><td>{v['aurc']:.3f} [{v['low']:.3f}, {v['high']:.3f}]</td>{minus(v)}</tr>"
                        for name, v in selective["aurc"].items() if name != "random")
        rnd = selective["aurc"]["random"]
        selective_html = (
            f'<h2>Selective answering (risk-coverage)</h2><img alt="risk-coverage" src="{plots["risk_coverage"]}">'
            f"<table><tr><th>signal</th><th>AURC (lower = better) [95% over problems]</th><th>minus {e(base)}</th>"
            f"</tr>{srows}<tr><td>no signal (answer in random order)</td><td>{rnd['aurc']:.3f} [{rnd['low']:.3f}, "
            f"{rnd['high']:.3f}]</td><td></td></tr></table>")
    bundle_html = card_html = ""
    if bundle_dir is not None:
        from rpe.report import bundle_section, report_card_section

        bundle_html = bundle_section(bundle_dir)
        card_html = report_card_section(bundle_dir, **(card_results or {}))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}} table{{border-collapse:collapse;margin:0.5em 0}}
th,td{{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}} .correct h4{{color:#1a7f37}}
.incorrect h4{{color:#b42318}} pre{{white-space:pre-wrap;margin:0}} img{{max-width:100%}} img.half{{max-width:60%}}
.warn{{background:#fff4e5;border-left:4px solid #f79009;padding:0.4em 0.8em}}
@media (max-width:700px){{img.half{{max-width:100%}}}}</style></head><body>
<h1>{e(title)}</h1>
{card_html}
<p>{len(by_traj)} trajectories, {len(table['step'])} states. AUROC of internal value at the final state vs outcome:
{auroc_fmt(auc_final[0])} [{auroc_fmt(auc_final[1])}, {auroc_fmt(auc_final[2])}], {e(chance_verdict(auc_final[1], auc_final[2]))}
(in-sample if these rollouts were used to fit the bundle).</p>
<h2>Internal value over reasoning steps</h2><img alt="value trajectories" src="{plots['value']}">
<h2>RPE distribution</h2><img alt="RPE distribution" src="{plots['rpe']}" class="half">
<h2>Surprises: steps with the largest |RPE|</h2>
<table><tr><th>trajectory</th><th>step</th><th>RPE</th><th>outcome</th><th>text</th></tr>{surprises}</table>
<h2>Calibration of internal value</h2><img alt="calibration" src="{plots['calibration']}">
<h2>Confidence before answering (AUROC, 95% bootstrap over problems)</h2>
<table><tr><th>signal at s_0</th><th>AUROC</th><th>reading</th><th>n</th></tr>{conf_rows}</table>
{selective_html}
<h2>Example trajectories</h2>{''.join(_trajectory_card(r, table) for r in correct + wrong)}
{bundle_html}
{''.join(extra_sections)}
</body></html>"""


def auroc_fmt(x: float) -> str:
    return "n/a (one class)" if x != x else f"{x:.3f}"


def _trajectory_batches(rollouts: str | Path, tokenizer, reward_column: str, batch_size: int,
                        encode_prompt: Callable[[str], list[int]] | None = None) -> Iterator[list[Trajectory]]:
    """Rollout folders stream from Parquet in batches; imported files are read whole, then batched."""
    from rpe.records import iter_trajectories

    path = Path(rollouts)
    if path.is_dir():
        empty = True
        for batch in iter_trajectories(path, batch_size):
            empty = False
            yield batch
        if empty:
            raise RolloutImportError(f"{path} holds no trajectories")
        return
    trajs = import_rollouts(path, tokenizer, reward_column=reward_column, encode_prompt=encode_prompt)
    for i in range(0, len(trajs), batch_size):
        yield trajs[i : i + batch_size]


def analyze_rollouts(model, tokenizer, bundle, rollouts: str | Path, out_dir: str | Path, *, reward_column: str = "reward",
                     bundle_dir: str | Path | None = None, extra_sections: Sequence[str] = (),
                     progress: Callable[[int, int], None] | None = None, batch_size: int = 128,
                     title: str | None = None, card_results: dict[str, dict] | None = None) -> dict[str, Any]:
    """Read rollouts batch by batch, compute the per-step table and confidence AUROCs, write
    ``steps.parquet``, ``confidence.json`` and ``report.html`` into ``out_dir``; returns paths and headline
    numbers. Only one batch of trajectories is held as Python objects at a time. ``title``: the page's (default:
    the model and the rollouts' folder); ``card_results``: see :func:`render_report`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rpe.difficulty import difficulty_by_problem
    from rpe.signals import SignalReader

    bundle.check_model(model, tokenizer)
    reader = SignalReader(bundle, model, tokenizer, check=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table: dict[str, list] = {c: [] for c in STEP_COLUMNS}
    conf_inputs = ConfidenceInputs()
    difficulty = difficulty_by_problem(rollouts) if Path(rollouts).is_dir() else None
    n_traj = 0
    encode = functools.partial(bundle.encode_text, tokenizer)  # an imported file's prompts, as the bundle's were
    for batch in _trajectory_batches(rollouts, tokenizer, reward_column, batch_size, encode):
        cols = step_table(model, tokenizer, bundle, batch, reader=reader)
        for c in STEP_COLUMNS:
            table[c] += cols[c]
        conf_inputs.add(model, tokenizer, batch, cols, difficulty)
        n_traj += len(batch)
        if progress:
            progress(n_traj, n_traj)
    conf = confidence(conf_inputs)
    selective = selective_answering(conf_inputs) if len(set(conf_inputs.y)) == 2 else None
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(table), sink)
    atomic_write_bytes(out_dir / "steps.parquet", sink.getvalue().to_pybytes())
    atomic_write_json(out_dir / "confidence.json", conf)
    if selective:
        atomic_write_json(out_dir / "selective.json", selective)
    title = title or f"rpe analysis: {bundle.model.name} on {Path(rollouts).name}"
    page = render_report(table, conf, title=title, bundle_dir=bundle_dir, extra_sections=extra_sections,
                         card_results=card_results, selective=selective)
    atomic_write_bytes(out_dir / "report.html", page.encode("utf-8"))
    return {"report": str(out_dir / "report.html"), "steps": str(out_dir / "steps.parquet"),
            "n_trajectories": n_traj, "n_states": len(table["step"]), "confidence": conf,
            "selective": selective["aurc"] if selective else None}


__all__ = ["ConfidenceInputs", "RolloutImportError", "STEP_COLUMNS", "analyze_rollouts", "answer_entropy", "confidence",
           "import_rollouts", "render_report", "selective_answering", "step_table"]
