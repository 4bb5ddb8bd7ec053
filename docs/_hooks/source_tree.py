"""MkDocs hook: a source tree in which ``rpe.envs`` and ``rpe.trainers`` sit where their import names say.

The repository maps ``envs/`` and ``trainers/`` onto ``rpe.envs`` / ``rpe.trainers`` with setuptools'
``package-dir`` (DESIGN.md), which static analysis (griffe, behind mkdocstrings) cannot follow (it resolves
symlinks, so a symlinked tree does not work either). This hook copies ``rpe/`` with ``envs/`` and ``trainers/``
inside it to ``.docs_src/rpe`` (a few hundred KB of source, ignored by git) before the API reference is
rendered; ``mkdocs.yml`` points mkdocstrings at it. In the copy, the docstrings' Sphinx roles become
cross-references (``crossrefs.py``).
"""

import shutil
import sys
from pathlib import Path

from mkdocs.plugins import event_priority


@event_priority(100)  # before mkdocstrings reads its `paths` (it drops a search path that does not exist yet)
def on_config(config):
    root = Path(config.config_file_path).parent
    tree = root / ".docs_src" / "rpe"
    if tree.parent.exists():
        shutil.rmtree(tree.parent)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(root / "rpe", tree, ignore=skip)
    for sub in ("envs", "trainers"):
        shutil.copytree(root / sub, tree / sub, ignore=skip)
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from crossrefs import rewrite_tree
    finally:
        sys.path.pop(0)
    rewrite_tree(tree, root / "docs" / "reference" / "api.md")
    return config
