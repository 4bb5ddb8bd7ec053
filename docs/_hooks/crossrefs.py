"""Cross-references in the API reference: the docstrings' Sphinx roles become links.

The docstrings use Sphinx roles (``:class:`~rpe.bundle.SubsystemBundle```, ``:func:`load_task```), which read
well in ``help()`` and an editor but which mkdocstrings prints as literal text. This module rewrites them in the
copied source tree (``.docs_src``, see ``source_tree.py``) before mkdocstrings reads it: a role whose target the
reference renders becomes a Markdown cross-reference ``[`SubsystemBundle`][rpe.bundle.SubsystemBundle]`` (resolved
by mkdocs-autorefs); a member the page does not render (a private helper, an attribute) links to its class when
that is rendered; anything else becomes plain code. So no role is left as text and no link is broken (the build
runs with ``--strict``).

Targets resolve as Sphinx would: a full dotted path (``rpe.signals.SignalReader``; a re-exported name such as
``rpe.envs.LLMPolicy`` by its canonical definition), a name in the docstring's own module, a member of a class of
that module, or a name defined exactly once anywhere in the package.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROLE = re.compile(r":(?:class|meth|func|attr|data|mod|exc|obj):`(?P<tilde>~?)(?P<target>[\w.]+?)(?:\(\))?`")
DIRECTIVE = re.compile(r"^:::\s+([\w.]+)\s*$", re.M)


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def definitions(root: Path) -> dict[str, bool]:
    """Every module, top-level name and class member under ``root`` (a package folder), by canonical dotted
    path, mapped to whether it has a docstring (what mkdocstrings renders for a member)."""
    out: dict[str, bool] = {}
    for path in sorted(root.rglob("*.py")):
        mod = _module_name(root, path)
        tree = ast.parse(path.read_text())
        out[mod] = ast.get_docstring(tree) is not None
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out[f"{mod}.{node.name}"] = ast.get_docstring(node) is not None
                if isinstance(node, ast.ClassDef):
                    for sub in node.body:
                        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            out[f"{mod}.{node.name}.{sub.name}"] = ast.get_docstring(sub) is not None
                        elif isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name):
                            out[f"{mod}.{node.name}.{sub.target.id}"] = False
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        out[f"{mod}.{t.id}"] = False
    return out


def rendered(defs: dict[str, bool], directives: list[str]) -> set[str]:
    """The identifiers the API page gives a heading (an anchor): each ``:::`` object, and its public members with
    docstrings, recursively (a documented module's functions, a documented class's methods)."""
    out: set[str] = set()
    for top in directives:
        out.add(top)
        prefix = top + "."
        for ident, has_doc in defs.items():
            rest = ident.removeprefix(prefix)
            if ident.startswith(prefix) and has_doc and not any(part.startswith("_") for part in rest.split(".")):
                out.add(ident)
    return out


def resolve(target: str, module: str, defs: dict[str, bool]) -> str | None:
    """The canonical path a role's target names, seen from ``module``; None when it names nothing in the package."""
    if target in defs:
        return target
    if f"{module}.{target}" in defs:
        return f"{module}.{target}"
    last = target.rsplit(".", 1)[-1]
    in_module = [d for d in defs if d.startswith(module + ".") and d.endswith("." + target)]
    if len(in_module) == 1:
        return in_module[0]
    anywhere = [d for d in defs if d.endswith("." + target)] or (
        [d for d in defs if d.endswith("." + last)] if "." in target else [])
    return anywhere[0] if len(anywhere) == 1 else None


def rewrite(text: str, module: str, defs: dict[str, bool], linkable: set[str]) -> str:
    """``text`` with every role replaced by a cross-reference or plain code (see the module docstring)."""

    def one(m: re.Match) -> str:
        target = m.group("target")
        shown = target.rsplit(".", 1)[-1] if m.group("tilde") else target
        canonical = resolve(target, module, defs)
        for candidate in (canonical, canonical.rsplit(".", 1)[0] if canonical else None):
            if candidate in linkable:
                return f"[`{shown}`][{candidate}]"
        return f"`{shown}`"

    return ROLE.sub(one, text)


def rewrite_tree(root: Path, api_page: Path) -> int:
    """Rewrite every ``.py`` file under ``root`` in place; returns the number of roles replaced."""
    defs = definitions(root)
    linkable = rendered(defs, DIRECTIVE.findall(api_page.read_text()))
    count = 0
    for path in root.rglob("*.py"):
        text = path.read_text()
        n = len(ROLE.findall(text))
        if n:
            path.write_text(rewrite(text, _module_name(root, path), defs, linkable))
            count += n
    return count
