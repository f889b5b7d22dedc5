"""`python -m stages.compare`: the experiments it names and queues (the base and the change over
the seeds, none queued twice), the run of the queue and the report it asks for. DVC and git are
stood in for: the real queue and report are tested in tests/e2e (test_dvc_e2e, test_report)."""

from __future__ import annotations

import pytest
import typer

from pipeline_lib.base.errors import PipelineError
from stages import compare, report


def test_experiments_pair_the_seeds_and_name_the_change():
    runs = compare.experiments("abc1234", ["head.dropout=0.3", "train.lr=0.01"], 2, 0)
    tag = runs["change"][0][0].split("-")[2]
    assert len(tag) == 8
    assert runs == {
        "base": [
            ("cmp-abc1234-base-s0", ["train.seed=0"]),
            ("cmp-abc1234-base-s1", ["train.seed=1"]),
        ],
        "change": [
            (f"cmp-abc1234-{tag}-s0", ["head.dropout=0.3", "train.lr=0.01", "train.seed=0"]),
            (f"cmp-abc1234-{tag}-s1", ["head.dropout=0.3", "train.lr=0.01", "train.seed=1"]),
        ],
    }
    # the same change in another order is the same experiments; another change is not
    same = compare.experiments("abc1234", ["train.lr=0.01", "head.dropout=0.3"], 2, 0)
    assert same["change"][0][0] == runs["change"][0][0]
    other = compare.experiments("abc1234", ["head.dropout=0.5"], 2, 0)
    assert other["change"][0][0] != runs["change"][0][0]
    # the noise check: the same params, the change's seeds from 3 on
    aa = compare.experiments("abc1234", [], 3, 3)
    assert [values for _, values in aa["change"]] == [[f"train.seed={k}"] for k in (3, 4, 5)]


@pytest.mark.parametrize("bad", ["head.dropout", "=0.3", "train.seed=4"])
def test_a_set_that_is_not_a_change_is_refused(bad):
    with pytest.raises(PipelineError, match="give key=value, a param other than train.seed"):
        compare.experiments("abc1234", [bad], 2, 0)


def test_main_queues_what_is_missing_runs_the_queue_and_reports(monkeypatch, tmp_path):
    calls, reported = [], {}

    def dvc(*args):
        calls.append(args)
        return "cmp-abc1234-base-s0\nsomething-else\n" if args[:2] == ("exp", "list") else ""

    class Done:
        returncode = 0

    def run(args, check):
        calls.append(tuple(args))
        return Done()

    monkeypatch.setattr(report, "dvc", dvc)
    monkeypatch.setattr(compare, "git", lambda *args: "abc1234\n")
    monkeypatch.setattr(compare.subprocess, "run", run)
    monkeypatch.setattr(report, "main", lambda **kw: reported.update(kw))
    compare.main(sets=["eval.nms_iou=0.4"], seeds=2, change_seed=0, out=tmp_path / "r")
    tag = compare.experiments("abc1234", ["eval.nms_iou=0.4"], 2, 0)["change"][0][0][:-3]
    assert calls == [
        ("exp", "list", "--name-only"),
        ("exp", "run", "--queue", "-n", "cmp-abc1234-base-s1", "-S", "train.seed=1"),
        (
            "exp",
            "run",
            "--queue",
            "-n",
            f"{tag}-s0",
            "-S",
            "eval.nms_iou=0.4",
            "-S",
            "train.seed=0",
        ),
        (
            "exp",
            "run",
            "--queue",
            "-n",
            f"{tag}-s1",
            "-S",
            "eval.nms_iou=0.4",
            "-S",
            "train.seed=1",
        ),
        ("dvc", "exp", "run", "--run-all"),
    ]
    assert reported == {
        "base": "cmp-abc1234-base-s0,cmp-abc1234-base-s1",
        "new": f"{tag}-s0,{tag}-s1",
        "out": tmp_path / "r",
    }


def test_a_failed_experiment_stops_before_the_report(monkeypatch, capsys):
    class Failed:
        returncode = 1

    monkeypatch.setattr(report, "dvc", lambda *args: "")
    monkeypatch.setattr(compare, "git", lambda *args: "abc1234\n")
    monkeypatch.setattr(compare.subprocess, "run", lambda args, check: Failed())
    monkeypatch.setattr(report, "main", lambda **kw: pytest.fail("no report after a failure"))
    with pytest.raises(typer.Exit):
        compare.main(sets=["eval.nms_iou=0.4"], seeds=1, change_seed=0)
    assert "an experiment failed: see `dvc queue status`" in capsys.readouterr().err


def test_nothing_to_compare_is_said(monkeypatch, capsys):
    monkeypatch.setattr(compare, "git", lambda *args: pytest.fail("nothing to run"))
    with pytest.raises(typer.Exit):
        compare.main(sets=None, seeds=3, change_seed=1)
    assert "nothing to compare: give -S key=value, or --change-seed SEEDS" in (
        capsys.readouterr().err
    )
