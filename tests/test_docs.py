"""The documentation cannot drift from the code: every Python example in ``docs/`` runs here (on a tiny random
model and a bundle fitted for it, as each page says), the docstring examples run as doctests, the CLI reference
is generated from the CLI, and the README stays a landing page."""

from __future__ import annotations

import doctest
import importlib
import os
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.S)
NO_RUN = re.compile(r"<!-- no-run: (?P<reason>[^>]+?) -->")
TRL_PAGES = {"guides/trl.md", "guides/internal-rewards.md", "guides/recipes.md"}


def python_blocks(page: Path) -> list[tuple[int, str, str | None]]:
    """``(line, code, no-run reason or None)`` for every ```python block of a page."""
    text = "\n" + page.read_text()
    out = []
    for m in FENCE.finditer(text):
        line = text[: m.start("code")].count("\n")
        skip = NO_RUN.search(m.group("before"))
        out.append((line, m.group("code"), skip.group("reason") if skip else None))
    return out


def pages() -> list[str]:
    return sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if "_hooks" not in p.parts)


def test_every_page_is_in_the_nav_and_skipped_blocks_say_why():
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def flat(items):
        for it in items:
            for v in it.values():
                yield from (flat(v) if isinstance(v, list) else [v])

    listed = set(flat(nav))
    assert set(pages()) <= listed | {"reference/cli.md"}, set(pages()) - listed
    blocks = [b for p in pages() for b in python_blocks(DOCS / p)]
    assert len(blocks) >= 12
    skipped = [b for b in blocks if b[2] is not None]
    assert len(skipped) <= 2 and all(len(reason) > 20 for _, _, reason in skipped)


@pytest.fixture
def docs_workspace(tmp_path, monkeypatch):
    """A working directory as the pages assume it after `make demo`: ``runs/demo/bundle`` and ``recipes/``. The
    pages load their own model; here ``rpe.models.load_model`` answers the default model's name with a tiny random
    Llama (and ``runs/demo/bundle`` is a bundle for it), so every example runs in seconds. Nothing is put in the
    pages' namespace: a page that uses a name it does not define fails."""
    import rpe.models
    from rpe.bundle import random_bundle
    from rpe.tiny import tiny_model

    model, tok = tiny_model()
    bundle = random_bundle(model, tok, layer=2, k=6, m=4, hidden=16, seed=0)
    bundle.save(tmp_path / "runs" / "demo" / "bundle")
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    real_load = rpe.models.load_model

    def load_model(name, **kwargs):
        return (model, tok) if name == rpe.models.DEFAULT_MODEL else real_load(name, **kwargs)

    monkeypatch.setattr(rpe.models, "load_model", load_model)
    monkeypatch.chdir(tmp_path)
    return {}


def _trl_page_inputs(ns: dict) -> None:
    """What the internal-rewards page takes from the TRL page: its first block (dataset, verifiable reward)."""
    code = python_blocks(DOCS / "guides" / "trl.md")[0][1]
    exec(compile(code, "guides/trl.md:dataset", "exec"), ns)


AFTER = {  # what each page's examples must have produced, beyond running
    "guides/trl.md": lambda ns: {"rpe/value_s0", "rpe/rpe_mean", "rpe/captured"} <= set(ns["logged"]),
    "guides/internal-rewards.md": lambda ns: ns["trainer"].state.log_history[0]["critic/loss"] >= 0
    and list(ns["adv"]) == pytest.approx([0.8, 0.5, 0.1]),
    "guides/recipes.md": lambda ns: ns["outcome"].summary["steps"] == 1,
    "guides/analysis.md": lambda ns: Path("analysis/report.html").exists() and len(ns["sig"].values) == 3,
    "guides/gymnasium.md": lambda ns: len(ns["values"]) == 4 and ns["policy"].stats["calls"] == 4
    and len(ns["vector_values"]) == 5 and all(len(v) == 4 for v in ns["vector_values"]),
    "guides/models-tasks.md": lambda ns: [p.answer for p in ns["mine"].problems(2, seed=0)] == ["3/4", "12"],
}


@pytest.mark.parametrize("page", [p for p in pages() if any(b[2] is None for b in python_blocks(DOCS / p))])
def test_page_examples_run(page, docs_workspace, capsys):
    if page in TRL_PAGES and not os.environ.get("RPE_REQUIRE_TRL"):
        pytest.importorskip("trl")
    ns: dict = {"__name__": "__docs__", **docs_workspace}
    if page == "guides/internal-rewards.md":
        _trl_page_inputs(ns)
    for line, code, skip in python_blocks(DOCS / page):
        if skip is None:
            exec(compile(code, f"docs/{page}:{line}", "exec"), ns)
    check = AFTER.get(page)
    assert check is None or check(ns), f"docs/{page}: the examples ran but did not produce what the page says"


DOCTEST_MODULES = ["rpe.metrics", "rpe.dopamine", "rpe.tasks", "rpe.tracker", "rpe.interventions", "rpe.signals", "rpe.crossval"]


@pytest.mark.parametrize("module", DOCTEST_MODULES)
def test_docstring_examples(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module} has no docstring example"
    assert result.failed == 0


def test_cli_reference_lists_every_command_and_option():
    import typer

    from rpe.cli import app
    from rpe.cli.reference import cli_markdown

    md = cli_markdown()
    root = typer.main.get_command(app)
    for name, cmd in root.commands.items():
        subs = getattr(cmd, "commands", {}) or {"": cmd}
        for sub_name, sub in subs.items():
            assert f"`rpe {name} {sub_name}`".replace(" `", "`") in md or f"`rpe {name}`" in md
            for p in sub.params:
                if p.name != "help":
                    assert f"`{p.opts[0]}`" in md, (name, sub_name, p.opts)
    assert "| `--out` | Path | required |" in md


def test_readme_is_a_landing_page():
    readme = (ROOT / "README.md").read_bytes()
    assert len(readme) <= 15_000, f"README.md is {len(readme)} bytes; move material into docs/"
    text = readme.decode()
    for must in ("make demo", "make test", "RPECallback(", "Report card", "make docs", "docs/"):
        assert must in text, must


def test_api_reference_turns_every_sphinx_role_into_a_link_or_code(tmp_path):
    """The docs build rewrites the docstrings' roles (docs/_hooks/crossrefs.py): a rendered target links, a member
    the page does not render links to its class, anything else is plain code; no role survives."""
    import sys

    sys.path.insert(0, str(DOCS / "_hooks"))
    try:
        from crossrefs import ROLE, definitions, rendered, rewrite
    finally:
        sys.path.pop(0)
    root = tmp_path / "rpe"
    shutil.copytree(ROOT / "rpe", root, ignore=shutil.ignore_patterns("__pycache__"))
    for sub in ("envs", "trainers"):
        shutil.copytree(ROOT / sub, root / sub, ignore=shutil.ignore_patterns("__pycache__"))
    defs = definitions(root)
    linkable = rendered(defs, ["rpe.bundle.SubsystemBundle", "rpe.tasks.load_task", "rpe.envs.policy.LLMPolicy"])
    text = ("See :class:`~rpe.bundle.SubsystemBundle`, :meth:`SubsystemBundle.encode_text`, :func:`load_task`, "
            ":class:`rpe.envs.LLMPolicy`, :func:`_private_helper` and :data:`rpe.tasks.TASKS`.")
    out = rewrite(text, "rpe.bundle", defs, linkable)
    assert not ROLE.search(out)
    assert "[`SubsystemBundle`][rpe.bundle.SubsystemBundle]" in out
    assert "[`SubsystemBundle.encode_text`][rpe.bundle.SubsystemBundle.encode_text]" in out  # a method with a docstring
    assert "[`load_task`][rpe.tasks.load_task]" in out  # resolved across modules: defined once in the package
    assert "[`rpe.envs.LLMPolicy`][rpe.envs.policy.LLMPolicy]" in out  # a re-export, by its definition
    assert "`_private_helper`" in out and "`rpe.tasks.TASKS`" in out and "][rpe.tasks.TASKS]" not in out
    n_roles = sum(len(ROLE.findall(p.read_text())) for p in root.rglob("*.py"))
    assert n_roles > 200  # the docstrings do use roles: this test guards a real rewrite
