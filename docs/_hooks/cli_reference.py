"""MkDocs hook: adds ``reference/cli.md``, rendered from the ``rpe`` Typer application at build time."""

from mkdocs.structure.files import File


def on_files(files, config):
    from rpe.cli.reference import cli_markdown

    files.append(File.generated(config, "reference/cli.md", content=cli_markdown()))
    return files
