import subprocess
import sys


def test_core_import_does_not_import_trl():
    code = (
        "import sys, rpe, rpe.models, rpe.tasks, rpe.envs, rpe.rollouts, rpe.tracker, rpe.probe, rpe.bundle, "
        "rpe.dopamine, rpe.fit, rpe.cli; print('trl' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_subpackages_map_to_folders():
    import rpe.envs
    import rpe.trainers

    assert rpe.envs.__file__.replace("\\", "/").endswith("envs/__init__.py")
    assert rpe.trainers.__file__.replace("\\", "/").endswith("trainers/__init__.py")


def _module_graph():
    """``{module: {imported rpe modules}}`` over every source file, function-level imports included."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = {}
    for folder, prefix in (("rpe", "rpe"), ("envs", "rpe.envs"), ("trainers", "rpe.trainers")):
        for path in (root / folder).rglob("*.py"):
            rel = path.relative_to(root / folder).with_suffix("").parts
            name = ".".join((prefix, *rel)).removesuffix(".__init__")
            files[name] = path
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rpe"):
                for alias in node.names:  # `from rpe.cli import bench` imports the submodule rpe.cli.bench
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in files else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("rpe")}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph, files


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
    assert "rpe.rollouts" not in graph["rpe.store"]  # the cycle this layout removed


def test_no_module_over_500_lines():
    _, files = _module_graph()
    long = {name: n for name, path in files.items() if (n := len(path.read_text().splitlines())) > 500}
    assert not long, f"split these modules (one concept each): {long}"
