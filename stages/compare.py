"""Run a param change over several seeds, and the base over as many, then report the change.

    python -m stages.compare -S head.grid_kind=fcos -S backbone.fine_layer=blocks.4 --seeds 3
    make compare SET="head.grid_kind=fcos backbone.fine_layer=blocks.4" SEEDS=3

Queues 2 x SEEDS DVC experiments from HEAD (`dvc exp run --queue`): the base (HEAD's params)
with train.seed 0 .. SEEDS-1, and the change (HEAD's params and the -S values) with the seeds
from --change-seed on (the same seeds by default; `--change-seed 3` without -S compares seeds 0-2
with seeds 3-5 of the same params, a check of the noise itself). They are named
cmp-<HEAD>-<base or the change's hash>-s<seed>: experiments of a former call with the same HEAD
are not run again (the base is shared by every change). Then runs the queue (`dvc exp run
--run-all`, one at a time, each experiment re-running what its params change) and writes the
report of the change's runs against the base's (stages/report.py): each headline figure's
interval covers the val images and the spread between the seeds.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Annotated

import typer

from pipeline_lib.base.errors import PipelineError
from stages import common, report


def experiments(head: str, sets: list[str], seeds: int, change_seed: int) -> dict[str, list]:
    """{"base": [(name, -S values)], "change": [...]}: the runs to compare, one per seed."""
    for value in sets:
        key, sep, _ = value.partition("=")
        if not sep or not key or key.strip() == "train.seed":
            raise PipelineError(f"-S {value!r}: give key=value, a param other than train.seed")
    tag = hashlib.sha256("\n".join(sorted(sets)).encode()).hexdigest()[:8]
    runs = {"base": [], "change": []}
    for k in range(seeds):
        runs["base"].append((f"cmp-{head}-base-s{k}", [f"train.seed={k}"]))
        seed = change_seed + k
        runs["change"].append((f"cmp-{head}-{tag}-s{seed}", [*sets, f"train.seed={seed}"]))
    return runs


def main(
    sets: Annotated[
        list[str] | None,
        typer.Option("-S", "--set-param", help="key=value of the change (repeat it)."),
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, max=20, help="Runs a side.")] = 3,
    change_seed: Annotated[int, typer.Option(min=0, help="The change's first seed.")] = 0,
    out: Annotated[Path, typer.Option(help="Folder of the report.")] = Path("report"),
) -> None:
    """Run the change and the base over SEEDS seeds each and report the change."""
    sets = sets or []
    with common.clean_errors():
        if not sets and change_seed < seeds:
            raise PipelineError("nothing to compare: give -S key=value, or --change-seed SEEDS")
        head = git("rev-parse", "--short=7", "HEAD").strip()
        runs = experiments(head, sets, seeds, change_seed)
        done = set(report.dvc("exp", "list", "--name-only").split())
        queued = 0
        for name, values in [*runs["base"], *runs["change"]]:
            if name in done:
                continue
            report.dvc("exp", "run", "--queue", "-n", name, *[a for v in values for a in ("-S", v)])
            queued += 1
        typer.echo(f"{queued} experiments queued, {2 * seeds - queued} done before")
        if queued and subprocess.run(["dvc", "exp", "run", "--run-all"], check=False).returncode:
            raise PipelineError("an experiment failed: see `dvc queue status` and `dvc queue logs`")
        names = {side: ",".join(name for name, _ in runs[side]) for side in runs}
    report.main(base=names["base"], new=names["change"], out=out)


def git(*args: str) -> str:
    """stdout of `git ARGS`; a clear error with git's message when it fails."""
    done = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    if done.returncode:
        raise PipelineError(f"`git {' '.join(args)}` failed: {done.stderr.strip()}")
    return done.stdout


if __name__ == "__main__":
    common.main(lambda: typer.run(main))
