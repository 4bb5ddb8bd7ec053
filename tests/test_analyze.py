import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from rpe.analyze import RolloutImportError, analyze_rollouts, import_rollouts

HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"


def _write_jsonl(path, n=24, seed=0, hostile=True):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            steps = [f"{i} + 1 = {i + 1}", f"{i + 1} + 2 = {i + 3}", f"Answer: {i + 3}"]
            if hostile and i == 0:
                steps[1] = HOSTILE
            f.write(json.dumps({"prompt": f"Q{i % 12}: {i}+1+2=", "steps": steps, "reward": float(rng.random() < 0.5),
                                "problem_id": f"p{i % 12}"}) + "\n")
    return path


def test_import_jsonl_and_table_formats(tiny_llama, tmp_path):
    _, tok = tiny_llama
    trajs = import_rollouts(_write_jsonl(tmp_path / "r.jsonl"), tok)
    assert len(trajs) == 24 and [s.text for s in trajs[1].steps] == ["1 + 1 = 2", "2 + 2 = 4", "Answer: 4"]
    for t in trajs:  # spans index the right tokens
        for s in t.steps:
            assert tok.decode(t.completion_token_ids[s.token_start : s.token_end]).strip() == s.text
    import pandas as pd  # TRL-style completions table: prompt, completion, a reward column named 'correct'

    pd.DataFrame({"prompt": ["a", "b"], "completion": ["x\n\nAnswer: 1", "y"], "correct": [1.0, 0.0]}).to_parquet(tmp_path / "t.parquet")
    got = import_rollouts(tmp_path / "t.parquet", tok, reward_column="correct")
    assert [len(t.steps) for t in got] == [2, 1] and [t.reward for t in got] == [1.0, 0.0]


@pytest.mark.parametrize("line,message", [
    ({"steps": ["a"], "reward": 1}, "r.jsonl:1: missing field 'prompt'"),
    ({"prompt": "q", "steps": ["a"]}, "r.jsonl:1: missing field 'reward'"),
    ({"prompt": "q", "reward": 1}, "missing field 'steps'"),
    ({"prompt": "q", "steps": ["a\n\nb"], "reward": 1}, "steps do not match the text"),
    ({"prompt": "q", "steps": ["a"], "reward": "yes"}, "is not a number"),
])
def test_bad_imports_name_the_record_and_field(tiny_llama, tmp_path, line, message):
    _, tok = tiny_llama
    (tmp_path / "r.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(RolloutImportError, match=message):
        import_rollouts(tmp_path / "r.jsonl", tok)


def test_empty_inputs_are_refused(tiny_llama, tmp_path):
    _, tok = tiny_llama
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(RolloutImportError, match="no records"):
        import_rollouts(tmp_path / "e.jsonl", tok)
    with pytest.raises(RolloutImportError, match="does not exist"):
        import_rollouts(tmp_path / "missing.jsonl", tok)


@pytest.fixture(scope="module")
def analysed(tiny_llama, tiny_bundle, tmp_path_factory):
    model, tok = tiny_llama
    tmp = tmp_path_factory.mktemp("an")
    res = analyze_rollouts(model, tok, tiny_bundle, _write_jsonl(tmp / "r.jsonl"), tmp / "out")
    return res, tmp / "out"


def test_analysis_outputs(analysed, tiny_llama, tiny_bundle):
    import pyarrow.parquet as pq

    from rpe.signals import SignalReader

    res, out = analysed
    table = pq.read_table(out / "steps.parquet").to_pydict()
    assert len(table["step"]) == 24 * 4 == res["n_states"]  # s_0 plus three steps each
    v = np.array(table["value"])
    # the value column is V(s_0..s_3) of each trajectory as an independent SignalReader read gives it
    model, tok = tiny_llama
    trajs = import_rollouts(out.parent / "r.jsonl", tok)
    sigs = SignalReader(tiny_bundle, model, tok).read([t.prompt_token_ids for t in trajs],
                                                      [t.completion_token_ids for t in trajs])
    np.testing.assert_allclose(v, np.concatenate([s.values for s in sigs]), atol=1e-5)
    np.testing.assert_allclose(np.array(table["dopamine"]).reshape(24, 4)[:, 1:],
                               np.stack([s.dopamine for s in sigs]), atol=1e-4)
    rpe = np.array(table["rpe"]).reshape(24, 4)
    np.testing.assert_allclose(rpe[:, 1:], (1 - 1e-5) * v.reshape(24, 4)[:, 1:] - v.reshape(24, 4)[:, :-1], atol=1e-9)
    conf = json.loads((out / "confidence.json").read_text())
    assert set(conf) >= {"value neurons V(s_0)", "question length (shorter = more confident)", "mean prompt log-prob"}
    # selective answering: the AURC of V(s_0) is the mean error rate of answering the most confident first
    from rpe.metrics import aurc

    sel = json.loads((out / "selective.json").read_text())
    y = np.array(table["reward"]).reshape(24, 4)[:, 0]
    assert sel["aurc"]["value neurons V(s_0)"]["aurc"] == pytest.approx(aurc(y, v.reshape(24, 4)[:, 0]))
    assert sel["aurc"]["value neurons V(final), after the answer"]["aurc"] == pytest.approx(aurc(y, v.reshape(24, 4)[:, -1]))
    assert sel["aurc"]["random"]["aurc"] == pytest.approx(1 - y.mean()) and res["selective"] == sel["aurc"]
    assert "minus_baseline" in sel["aurc"]["mean prompt log-prob"] and sel["baseline"].startswith("question length")
    page = (out / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page and "onerror=" not in page.replace("onerror=&quot;", "")


def test_failed_report_keeps_the_old_one(tiny_llama, tiny_bundle, analysed, monkeypatch):
    import rpe.analyze as analyze

    model, tok = tiny_llama
    _, out = analysed
    before = (out / "report.html").read_bytes()
    monkeypatch.setattr(analyze, "render_report", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        analyze.analyze_rollouts(model, tok, tiny_bundle, out.parent / "r.jsonl", out)
    assert (out / "report.html").read_bytes() == before


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None and not os.environ.get("RPE_REQUIRE_BROWSER"),
                    reason="headless Chromium not installed (make test installs it where apt-get works)")
def test_report_renders_in_headless_chromium_and_runs_no_model_script(analysed, tmp_path):
    import base64
    import re

    if _chromium() is None:  # `make test` on a machine with apt-get: the install failed, which must not pass silently
        pytest.fail("RPE_REQUIRE_BROWSER is set but no chromium is installed: see `make browser`")

    _, out = analysed
    url = (out / "report.html").resolve().as_uri()
    args = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run(args + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<title>rpe analysis" in dom.stdout and "pwned" not in re.findall(r"<title>(.*?)</title>", dom.stdout)[0]
    assert "<script" not in dom.stdout  # the hostile completion stayed text
    assert "CONSOLE" not in dom.stderr and "Uncaught" not in dom.stderr
    imgs = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', dom.stdout)
    assert {a for a, _ in imgs} >= {"value trajectories", "RPE distribution", "calibration", "risk-coverage"}
    for _, b64 in imgs:
        png = base64.b64decode(b64)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") > 100  # width > 100 px
    shot = tmp_path / "shot.png"
    run = subprocess.run(args + ["--window-size=1000,1400", f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert run.returncode == 0 and shot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_result_sections_show_the_numbers_and_escape_names(tmp_path):
    from rpe.report import ablation_section, search_section, transfer_section

    search = {"n_problems": 200, "config": {"n": 4}, "methods": {
        "<b>value</b>": {"accuracy": 0.4, "ci95": [0.33, 0.47], "tokens_per_problem": 120.4, "accuracy_per_1k_tokens": 3.32}}}
    (tmp_path / "search.json").write_text(json.dumps(search))
    page = search_section(tmp_path / "search.json")
    assert "&lt;b&gt;value&lt;/b&gt;" in page and "<b>" not in page
    assert "0.400 [0.330, 0.470]" in page and ">120<" in page and "3.32" in page
    (tmp_path / "transfer_heatmap.json").write_text(json.dumps({"k": 29, "d": 576, "chance_iou": 0.0258, "labels": [],
                                                                "iou": []}))
    page = transfer_section(tmp_path / "transfer_heatmap.json")
    assert "top 29 of 576" in page and "<img" not in page  # no PNG beside it: no broken image
    from rpe.records import write_trajectories
    from test_report import _traj

    abl = tmp_path / "ablation"
    correct = {"baseline": 8, "layer28/value": 2, "layer28/random_0": 7}  # of 10 problems, same problem ids
    for arm, n_right in correct.items():
        (abl / arm).mkdir(parents=True)
        write_trajectories(abl / arm / "trajectories.parquet",
                           [_traj(i, "Answer: 1", float(i < n_right)) for i in range(10)])
        (abl / arm / "manifest.json").write_text("{}")
    (abl / "results.json").write_text(json.dumps({"n_neurons": 6, "baseline": {"accuracy": 0.8}, "layers": {
        "28": {"summary": {"value": {"accuracy": 0.2, "drop": 0.6}}}}}))
    (abl / "causal_rpe.json").write_text(json.dumps({"ablation_layer": 24, "dopamine_layer": 28, "baseline": 0.412,
                                                     "shares": {"0.1": {"n_neurons": 58, "value": 0.345, "random_mean": 0.43}}}))
    page = ablation_section(abl)
    # value arm: 0.2 vs none 0.8, a drop of 0.6 on the same ten problems (six lost, none won); the paired
    # interval of six 1s and four 0s excludes 0
    assert "<td>value</td><td>0.200</td><td>+0.600 [+0.300, +0.900]</td><td>drops</td><td>6 / 0</td>" in page
    assert "<td>random_0</td><td>0.700</td><td>+0.100" in page
    assert "<td>random_0</td><td>+0.500 [" in page and "control higher" in page  # 0.7 - 0.2 on the same problems
    assert 'alt="ablation drops" src="data:image/png;base64,' in page
    assert "Causal RPE check" in page and "10% (58)" in page


def test_selective_answering_scores_the_tasks_difficulty_cross_fitted():
    """Where the task names its difficulty, a difficulty-only signal joins the table: on outcomes that the number
    of terms decides (2 terms right, 4 wrong) it orders answers as well as the outcome itself, scored with no fit
    that saw the trajectory's problem; without difficulty features it is absent."""
    from rpe.analyze import DIFFICULTY_SIGNAL, ConfidenceInputs, selective_answering
    from rpe.metrics import aurc

    rng = np.random.default_rng(0)
    terms = np.repeat(rng.choice([2.0, 4.0], size=30), 2)  # two samples of each of 30 problems
    y = (terms == 2.0).astype(float)
    base = dict(y=list(y), groups=[f"p{i // 2}" for i in range(60)], value_s0=list(rng.random(60)),
                value_final=list(rng.random(60)), question_length=list(rng.integers(20, 30, 60).astype(float)),
                prompt_logprob=list(rng.random(60)))
    with_difficulty = ConfidenceInputs(**base, difficulty=[{"num_terms": t} for t in terms])
    sel = selective_answering(with_difficulty, n_boot=50)
    assert sel["aurc"][DIFFICULTY_SIGNAL]["aurc"] == pytest.approx(aurc(y, y))
    assert sel["aurc"][DIFFICULTY_SIGNAL]["minus_baseline"]["high"] < 0  # better than question length here
    assert DIFFICULTY_SIGNAL not in selective_answering(ConfidenceInputs(**base), n_boot=50)["aurc"]
