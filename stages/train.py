"""Stages train_single and train_multi: train a detection head on the cached features.

    python -m stages.train single [--params params.yaml]
    python -m stages.train multi  [--params params.yaml]

Writes, for KIND = single | multi,
- models/KIND.safetensors: the head of the best epoch (train.monitor on val) with everything
  needed to use it: backbone, layer, normalisation, image mode and size, classes, head params
  (see pipeline_lib/models/heads.py),
- reports/train_KIND/metrics.json: the headline figures (DVC metrics; tasks.training_metrics):
  best epoch, its val loss / accuracy / IoU (and objectness accuracy), train loss, s/epoch, ...,
- reports/train_KIND/plots/metrics/{train,val}/*.tsv: dvclive's curves, every measure, one row
  per epoch (DVC plots), and training_curves.png.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer
from dvclive import Live
from scmrepo.exceptions import SCMError

from pipeline_lib.base.errors import PipelineError
from pipeline_lib.base.files import write_json
from pipeline_lib.base.params import Params, load_params
from pipeline_lib.features.devices import pick_device
from pipeline_lib.models.checkpoints import save_checkpoint
from pipeline_lib.reporting.plots import save_figure, training_curves
from pipeline_lib.training.loop import (
    epoch_line,
    fit,
    pin_cpu_kernels,
    seed_everything,
)
from pipeline_lib.training.tasks import (
    SPLITS,
    Task,
    TrainingInputs,
    finish_card,
    grid_task,
    read_training_inputs,
    single_task,
    train_config,
    training_metrics,
)
from stages import common

app = common.command_group("Train a head on the cached features.")


@app.command()
def single(params_file: Path = common.PARAMS_OPTION, progress: bool = True) -> None:
    """Single-object head: class and box of each image's largest object."""
    run(single_task, params_file, progress)


@app.command()
def multi(params_file: Path = common.PARAMS_OPTION, progress: bool = True) -> None:
    """Multi-object grid head: box, class and objectness per cell."""
    run(grid_task, params_file, progress)


def run(make_task: Callable[[TrainingInputs, Params], Task], params_file: Path, progress: bool):
    """Read the params and inputs, build the task, train it."""
    with common.clean_errors():
        params = begin(params_file)
        lazy = params.train.features == "disk"
        inputs = read_training_inputs(common.PREPARED_DIR, common.FEATURES_DIR, lazy)
        train(make_task(inputs, params), params, progress)


def begin(params_file: Path) -> Params:
    """Read the params, choose the CPU kernels (before torch computes anything) and seed."""
    params = load_params(params_file)
    warning = pin_cpu_kernels(params.train.cpu_kernels)
    if warning:
        common.warn(f"train.{warning}")
    seed_everything(params.train.seed)
    return params


def train(task: Task, params: Params, progress: bool) -> None:
    """Fit the task's head with dvclive logging; save the best epoch's model and curves."""
    for line in task.warnings:
        common.warn(line)
    for line in task.notes:
        typer.echo(line)
    p = params.train
    config = train_config(p, str(pick_device(p.device, "train.device")))
    kind = task.card.kind
    reports = common.REPORTS_DIR / f"train_{kind}"
    with open_live(reports) as live:

        def on_epoch(epoch: int, stats: dict) -> None:
            for split in SPLITS:
                for name in task.curves:
                    live.log_metric(f"{split}/{name}", round(stats[split][name], 6))
            live.log_metric("lr", stats["lr"])
            live.next_step()
            typer.echo(epoch_line(epoch, p.epochs, stats))

        result = fit(
            task.head,
            task.data["train"],
            task.data["val"],
            task.objective,
            config,
            on_epoch,
            progress,
        )
    # dvclive's own summary repeats every curve's last value (dozens of figures): ours instead
    write_json(reports / "metrics.json", training_metrics(task, result, config))
    task.head.load_state_dict(result.best_state)
    path = common.MODELS_DIR / f"{kind}.safetensors"
    save_checkpoint(path, task.head, finish_card(task, result, p))
    curves = training_curves(result.history, result.best_epoch, f"{kind}-object head")
    save_figure(curves, reports / "training_curves.png")
    typer.echo(
        f"best epoch {result.best_epoch} ({p.monitor} {result.best_monitor:.4f}); "
        f"{result.seconds / p.epochs:.2f} s/epoch -> {path}"
    )


def open_live(reports: Path) -> Live:
    """dvclive's logger for `reports` (it reads the git repository, which needs one commit)."""
    try:
        return Live(dir=str(reports), save_dvc_exp=False, dvcyaml=None)
    except SCMError as error:
        raise PipelineError(
            f"dvclive cannot read this git repository ({error}): commit once (git commit) "
            "before running the training stages"
        ) from None


if __name__ == "__main__":
    common.main(app)
