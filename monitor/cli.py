"""The ``latentwatch`` command."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="latentwatch: drift monitoring for the internals of deployed transformer models.",
                  no_args_is_help=True, add_completion=False)
console = Console()


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def sites(
    model: str = typer.Argument(..., help="smollm2, minilm, or a transformers model folder"),
    kind: str = typer.Option("", help="only sites of this kind: resid or attn"),
) -> None:
    """List the hook sites of MODEL with the module each one hooks."""
    from collectors import models
    from collectors.sites import available, default_sites

    loaded = models.load(model)
    defaults = set(default_sites(loaded.model))
    table = Table(title=f"sites of {loaded.name} ({loaded.kind})")
    for col in ("site", "kind", "module", "default"):
        table.add_column(col)
    for s in available(loaded.model):
        if kind and s.kind != kind:
            continue
        table.add_row(s.name, s.kind, s.module_path, "yes" if s.name in defaults else "")
    console.print(table)


@app.command()
def demo(
    model: str = typer.Option("smollm2", help="smollm2 or minilm"),
    out: Path = typer.Option(Path("latentwatch-out"), help="folder for the recorded signatures"),
    sample_rate: float = typer.Option(1.0, help="share of requests the tap samples"),
    quick: bool = typer.Option(False, help="fewer texts (for CI)"),
) -> None:
    """Run real text through a real model with the tap attached and record signatures."""
    from monitor.demo import run_demo

    summary = run_demo(model=model, out=out, sample_rate=sample_rate, quick=quick, console=console)
    console.print_json(json.dumps(summary))


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="a signature file written by the file sink"),
    limit: int = typer.Option(3, help="records to print as JSON"),
) -> None:
    """Print a recorded signature file's records as JSON (arrays shortened) and count bad ones."""
    from collectors.sinks import FileReadStats, read_file

    stats = FileReadStats()
    for i, rec in enumerate(read_file(path, stats)):
        if i < limit:
            obj = rec.to_json()
            obj["sites"] = {s: {n: f"{len(v)} values" if isinstance(v, list) else v for n, v in d.items()}
                            for s, d in obj["sites"].items()}
            console.print_json(json.dumps(obj))
    console.print(f"{stats.records} records, {stats.corrupt} corrupt, "
                  f"{stats.truncated_tail_bytes} bytes of truncated tail")
    if stats.corrupt:
        raise typer.Exit(1)
