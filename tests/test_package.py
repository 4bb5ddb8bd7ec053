"""The package's shape: importing rpe never imports TRL, no import cycle, every name has one home, and no module
reaches into another's private names. These are what the layout protects (docs/development.md)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: (folder, import name) of the package's three source folders (setuptools package-dir, DESIGN.md).
SOURCES = (("rpe", "rpe"), ("envs", "rpe.envs"), ("trainers", "rpe.trainers"))


def test_core_import_does_not_import_trl():
    code = (
        "import sys, rpe, rpe.models, rpe.tasks, rpe.envs, rpe.rollouts, rpe.tracker, rpe.probe, rpe.bundle, "
        "rpe.dopamine, rpe.fit, rpe.bench, rpe.bench.rollouts, rpe.cli; print('trl' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_subpackages_map_to_folders():
    import rpe.envs
    import rpe.trainers

    assert rpe.envs.__file__.replace("\\", "/").endswith("envs/__init__.py")
    assert rpe.trainers.__file__.replace("\\", "/").endswith("trainers/__init__.py")


def _source_files(root: Path = ROOT) -> dict[str, Path]:
    """``{module name: path}`` over the package's source folders under ``root``."""
    files = {}
    for folder, prefix in SOURCES:
        for path in (root / folder).rglob("*.py"):
            rel = path.relative_to(root / folder).with_suffix("").parts
            files[".".join((prefix, *rel)).removesuffix(".__init__")] = path
    return files


def _imports(tree: ast.AST):
    """``(module, name)`` for every ``from rpe... import name`` in ``tree`` (function-level imports included)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rpe" and node.level == 0:
            for alias in node.names:
                yield node.module, alias.name


def _module_graph(root: Path = ROOT):
    """``{module: {imported rpe modules}}`` over every source file, function-level imports included."""
    files = _source_files(root)
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        deps = set()
        for module, alias in _imports(tree):  # `from rpe.cli import bench` imports the submodule rpe.cli.bench
            sub = f"{module}.{alias}"
            deps.add(sub if sub in files else module)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("rpe")}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph, files


def _defined_names(tree: ast.Module) -> set[str]:
    """Names a module defines at top level: functions, classes, assignments, and names bound under ``if`` /
    ``try`` at top level (version switches)."""
    names: set[str] = set()
    body = list(tree.body)
    while body:
        node = body.pop(0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.If, ast.Try)):
            body += [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", [])]
            for handler in getattr(node, "handlers", []):
                body += handler.body
    return names


def _listed(tree: ast.Module) -> set[str]:
    """The strings of a module's ``__all__`` (empty without one); ``*NAME`` takes the keys of the top-level dict
    ``NAME`` (``rpe.trainers``' lazy ``_EXPORTS``)."""
    assigned = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    value = assigned.get("__all__")
    if value is None:
        return set()
    for starred in [e for e in ast.walk(value) if isinstance(e, ast.Starred) and isinstance(e.value, ast.Name)]:
        spread = assigned.get(starred.value.id)
        keys = spread.keys if isinstance(spread, ast.Dict) else [spread] if spread is not None else []
        value = ast.List(elts=[value, *keys])
    return {e.value for e in ast.walk(value) if isinstance(e, ast.Constant) and isinstance(e.value, str)}


def _homes(root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: names importable from it}``: what it defines, plus, for a package's ``__init__``, the names it
    takes from its own submodules (a package's public surface, as ``rpe.envs`` offers ``ReasoningEnv``)."""
    files = _source_files(root)
    homes = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        own = _defined_names(tree)
        if path.name == "__init__.py":
            own |= {alias for module, alias in _imports(tree) if module.startswith(name + ".")}
            own |= _listed(tree)  # a lazy package (``rpe.trainers`` imports TRL only when a name is used)
        homes[name] = own
    return homes


def _python_blocks(markdown: str) -> list[str]:
    """The ```python code blocks of a page that parse (the examples users copy)."""
    import re

    blocks = []
    for block in re.findall(r"```python\n(.*?)```", markdown, flags=re.S):
        try:
            ast.parse(block)
        except SyntaxError:
            continue
        blocks.append(block)
    return blocks


def _import_sites(root: Path = ROOT):
    """``(file, importing module or None, imported module, name)`` over the package, tests, benchmarks, doc hooks
    and the examples in README.md and docs/."""
    files = _source_files(root)
    by_path = {path: name for name, path in files.items()}
    paths = list(files.values()) + [p for d in ("tests", "benchmarks", "docs") for p in (root / d).rglob("*.py")]
    for path in paths:
        for module, alias in _imports(ast.parse(path.read_text())):
            yield path.relative_to(root), by_path.get(path), module, alias
    pages = [root / "README.md", *(root / "docs").rglob("*.md")]
    for page in (p for p in pages if p.exists()):
        for block in _python_blocks(page.read_text()):
            for module, alias in _imports(ast.parse(block)):
                yield page.relative_to(root), None, module, alias


def name_problems(root: Path = ROOT) -> list[str]:
    """Every import of a name from a module that is not its home, and every ``__all__`` entry a module does not
    define (a re-export), as readable lines."""
    files, homes = _source_files(root), _homes(root)
    problems = []
    for where, _, module, alias in _import_sites(root):
        if module not in files or alias == "*":
            continue
        if f"{module}.{alias}" in files:
            continue  # a submodule
        if alias not in homes[module]:
            problems.append(f"{where}: `{alias}` is imported from {module}, which is not its home")
    for name, path in files.items():
        submodules = {n.rsplit(".", 1)[-1] for n in files if n.startswith(name + ".")}
        for extra in sorted(_listed(ast.parse(path.read_text())) - homes[name] - submodules):
            problems.append(f"{name}: __all__ lists `{extra}`, defined elsewhere (a re-export)")
    return problems


def private_problems(root: Path = ROOT) -> list[str]:
    """Every ``from rpe.x import _private`` inside the package from a module other than ``rpe.x`` itself."""
    return [f"{where}: imports private `{alias}` from {module}"
            for where, importer, module, alias in _import_sites(root)
            if importer is not None and importer != module and alias.startswith("_") and not alias.startswith("__")]


def test_no_import_cycle_between_modules():
    graph, _ = _module_graph()
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert "rpe.rollouts" not in graph["rpe.store"]  # the cycle an earlier layout removed


def test_every_name_has_one_home():
    problems = name_problems()
    assert not problems, "import these from the module that defines them:\n" + "\n".join(problems)


def test_no_private_name_crosses_modules():
    problems = private_problems()
    assert not problems, "make these public in their home, or keep them inside it:\n" + "\n".join(problems)


def test_the_checks_fail_on_a_reexport_and_a_private_import(tmp_path):
    """The two checks above find what they are for: a name re-exported by a second module and imported from
    there, and a private helper imported by another module."""
    for folder, _ in SOURCES:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "rpe" / "home.py").write_text("def helper():\n    pass\n\n\ndef _private():\n    pass\n")
    (tmp_path / "rpe" / "other.py").write_text("from rpe.home import helper  # re-exported\n\n__all__ = ['helper']\n")
    (tmp_path / "rpe" / "user.py").write_text("from rpe.other import helper\nfrom rpe.home import _private\n")
    for d in ("tests", "benchmarks", "docs"):
        (tmp_path / d).mkdir()
    names = name_problems(tmp_path)
    assert any("`helper` is imported from rpe.other" in p for p in names)
    assert any("rpe.other: __all__ lists `helper`" in p for p in names)
    assert private_problems(tmp_path) == ["rpe/user.py: imports private `_private` from rpe.home"]
