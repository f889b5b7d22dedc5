"""What the stage scripts share: the output locations named in dvc.yaml, and clean failures."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import typer

from pipeline_lib.base.errors import PipelineError

# Keep in step with dvc.yaml.
SYNTHETIC_DIR = Path("data/synthetic")
SYNTHETIC_DATASET = SYNTHETIC_DIR / "VOCdevkit" / "VOCshapes"
PREPARED_DIR = Path("data/prepared")
PREPARE_REPORTS = Path("reports/prepare")
FEATURES_DIR = Path("data/features")
EXTRACT_REPORTS = Path("reports/extract")
MODELS_DIR = Path("models")
REPORTS_DIR = Path("reports")  # train_<kind>/ and evaluate_<kind>/ per head kind

VAL_FEATURES = FEATURES_DIR / "val.safetensors"

PARAMS_OPTION = typer.Option("params.yaml", "--params", help="The params file to read.")


def main(app: Callable[[], object]) -> None:
    """Run a stage's command line APP, everything its imports made frozen out of the garbage
    collector's walks first and the collector back on (stages/__init__.py says why)."""
    gc.freeze()
    gc.enable()
    app()


def command_group(help: str) -> typer.Typer:
    """A Typer app whose commands stay subcommands even when there is one (`train single`)."""
    app = typer.Typer(add_completion=False, help=help)
    app.callback()(lambda: None)
    return app


@contextlib.contextmanager
def clean_errors() -> Iterator[None]:
    """Turn the library's input errors into one 'error: ...' line on stderr and exit code 1."""
    try:
        yield
    except PipelineError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from None


def warn(message: str) -> None:
    """A yellow 'warning: ...' line on stderr."""
    typer.secho(f"warning: {message}", err=True, fg=typer.colors.YELLOW)


def restart_under_torchrun(processes: int, module: str, *args: str) -> None:
    """Replace this process by `torchrun --standalone --nproc-per-node PROCESSES -m MODULE ARGS`
    (params backbone.processes / finetune.processes > 1), unless it already runs under torchrun
    (its LOCAL_RANK is set). Same process id, so DVC and Ctrl-C see one command."""
    if processes <= 1 or "LOCAL_RANK" in os.environ:
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={processes}", "-m", module, *args]
    typer.echo(f"{processes} processes: {' '.join(command[1:])}")
    sys.stdout.flush()
    os.execv(sys.executable, command)
