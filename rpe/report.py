"""A self-contained HTML summary of a rollout folder (plots embedded as PNG, opens offline).

All model and user text is HTML-escaped: a completion holding ``<script>`` shows as text.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from pathlib import Path

from rpe.rollouts import MANIFEST_FILE, Trajectory, atomic_write_bytes, read_trajectories


def _png(fig) -> str:
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
    ax.set_xlabel("reasoning steps per completion")
    ax.set_ylabel("trajectories")
    ax.legend()
    return _png(fig)


def _trajectory_html(t: Trajectory) -> str:
    e = html.escape
    steps = "".join(f"<li><pre>{e(s.text)}</pre></li>" for s in t.steps) or "<li><em>(no steps)</em></li>"
    verdict = "correct" if t.reward >= 0.5 else "incorrect"
    return (
        f'<div class="traj {verdict}"><h4>{e(t.trajectory_id)} · {verdict} · answer {e(str(t.final_answer))} '
        f"(reference {e(t.reference_answer)}) · finish: {e(t.finish_reason)}</h4><ol>{steps}</ol></div>"
    )


def rollout_report(rollout_dir: str | Path, out: str | Path | None = None, n_examples: int = 6) -> Path:
    """Write ``report.html`` for a rollout folder and return its path (atomic: never half-written)."""
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
<h1>Rollouts</h1><table>{rows}</table>
<h2>Steps per completion</h2><img alt="steps per completion" src="{_steps_plot(trajectories)}">
<h2>Example trajectories</h2>{''.join(_trajectory_html(t) for t in correct + wrong)}
</body></html>"""
    atomic_write_bytes(out, page.encode("utf-8"))
    return out
