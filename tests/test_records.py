"""Per-image records: each detection judged as the devkit and COCO judge it (by hand), the
figures they give back (the devkit's mAP, pycocotools' and torchmetrics' COCO mAP on the same
detections), and the folder written and read back, or refused with the file named."""

from __future__ import annotations

import contextlib
import io
import json

import pandas as pd
import pytest
import torch
from test_metrics import image, jittered, random_truth

from pipeline_lib.base.errors import PipelineError
from pipeline_lib.measures.metrics import mean_ap, voc_average_precision
from pipeline_lib.measures.records import (
    Judging,
    MultiRecords,
    multi_records,
    read_records,
    write_records,
)

JUDGING = Judging(0.5, "continuous", 0.2)


def records_of(images, judging=JUDGING, classes=("cat",)) -> MultiRecords:
    """Records of (detections, truth) pairs made by test_metrics.image, images named im0, ..."""
    dets, gts = zip(*images, strict=True)
    rows = pd.DataFrame(
        {"image_id": [f"im{i}" for i in range(len(dets))], "path": "p.jpg", "width": 500}
    )
    rows["height"] = 400
    return multi_records(rows, list(dets), list(gts), list(classes), judging, "data")


def own(records: MultiRecords) -> dict[str, float]:
    """The records' figures on all their images (all-ones weights)."""
    ones = torch.ones(1, len(records.images), dtype=torch.float64)
    return {name: float(v[0]) for name, v in records.figure_draws(ones).items()}


def test_each_detection_judged_as_the_devkit_and_coco_judge_it():
    """Objects A (0, 0, 100, 100) and a difficult D (300, 300, 400, 400); detections in score
    order: A exactly (found), A again (a duplicate: false), D exactly (neither), far away
    (false), and (0, 0, 100, 72), continuous IoU 0.72 with A, ranked last."""
    a, d = [0, 0, 100, 100], [300, 300, 400, 400]
    boxes = [a, a, d, [600, 600, 650, 650], [0, 0, 100, 72]]
    records = records_of([image(boxes, [0.9, 0.8, 0.7, 0.6, 0.5], [a, d], [False, True])])
    rows = records.detections
    assert rows["outcome"].tolist() == [1, 0, -1, 0, 0]
    assert rows["object"].tolist() == [0, 0, 1, -1, 0]  # the object each took (or overlaps most)
    # COCO: the first takes A at every threshold; the second finds A taken: false; D is a crowd
    # region: neither; the last, 0.72 with A (taken): false
    coco = [list(c) for c in rows["coco"]]
    assert coco == [[1] * 10, [0] * 10, [-1] * 10, [0] * 10, [0] * 10]
    assert records.objects[["object", "class_id", "difficult"]].values.tolist() == [
        [0, 0, False],
        [1, 0, True],
    ]
    assert rows["score"].tolist() == [0.9, 0.8, 0.7, 0.6, 0.5]
    assert rows[["xmin", "ymin", "xmax", "ymax"]].values.tolist() == boxes


def test_coco_thresholds_and_the_cap_of_a_hundred_detections():
    # one object, one detection of continuous IoU 0.72: found at 0.50 ... 0.70, false beyond
    hit = records_of([image([[0, 0, 100, 72]], [0.9], [[0, 0, 100, 100]])])
    assert list(hit.detections["coco"][0]) == [1] * 5 + [0] * 5
    # 101 detections of a class in an image: the 100 best are counted, the last is not
    scores = [1 - k / 200 for k in range(101)]
    capped = records_of([image([[k, 0, k + 10, 10] for k in range(101)], scores, [[0, 0, 5, 5]])])
    outcome = [c[0] for c in capped.detections["coco"]]
    assert outcome[:100] == [0] * 100 and outcome[100] == -1


def test_coco_map_by_hand():
    """A hit at 5 of COCO's 10 thresholds -> mAP@[.5:.95] = 5 / 10; a second image holds a
    difficult object, COCO's crowd region: a detection on it is no false positive."""
    hit = image([[0, 0, 100, 72]], [0.9], [[0, 0, 100, 100]])
    crowd = image([[10, 10, 50, 50]], [0.95], [[10, 10, 50, 50]], [True])
    assert own(records_of([hit, crowd]))["coco_map"] == pytest.approx(0.5)
    assert own(records_of([hit, crowd]))["map"] == pytest.approx(1.0)
    perfect = image([[0, 0, 100, 100]], [0.9], [[0, 0, 100, 100]])
    assert own(records_of([perfect])) == pytest.approx({"map": 1.0, "coco_map": 1.0})


def pycocotools_map(detections, truth, n_classes) -> float:
    """COCO's bbox mAP@[.5:.95] by pycocotools itself (difficult objects as crowd regions)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset = {"images": [], "categories": [{"id": k} for k in range(n_classes)]}
    dataset["annotations"], found = [], []
    for i, ((boxes, labels, crowd), (d_boxes, scores, d_labels)) in enumerate(
        zip(truth, detections, strict=True)
    ):
        dataset["images"].append({"id": i, "width": 500, "height": 500})
        for (x0, y0, x1, y1), k, c in zip(
            boxes.tolist(), labels.tolist(), crowd.tolist(), strict=True
        ):
            dataset["annotations"].append(
                {
                    "id": len(dataset["annotations"]) + 1,
                    "image_id": i,
                    "category_id": k,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": int(c),
                }
            )
        for (x0, y0, x1, y1), s, k in zip(
            d_boxes.tolist(), scores.tolist(), d_labels.tolist(), strict=True
        ):
            found.append({"image_id": i, "category_id": k, "bbox": [x0, y0, x1 - x0, y1 - y0]})
            found[-1]["score"] = s
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(found), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_figures_equal_the_devkit_s_and_pycocotools(seed):
    """Random objects (some difficult) and jittered detections with tied scores: the records'
    mAP is metrics.voc_average_precision's (checked against the devkit's code) to the last
    digit, their COCO mAP pycocotools' own."""
    truth = random_truth(seed)
    detections = jittered(truth, 4, seed=seed, integer=False)
    records = records_of(
        list(zip(detections, truth, strict=True)), Judging(0.5, "continuous", 0.2), "abcd"
    )
    devkit = mean_ap(voc_average_precision(detections, truth, 4, 0.5, "continuous"))
    figures = own(records)
    assert figures["map"] == pytest.approx(devkit, abs=1e-12)
    assert figures["coco_map"] == pytest.approx(pycocotools_map(detections, truth, 4), abs=1e-12)
    assert 0.02 < figures["coco_map"] < figures["map"]


def test_coco_map_agrees_with_torchmetrics():
    """torchmetrics' MeanAveragePrecision (faster-coco-eval), the library this project used for
    COCO mAP, on the same detections (float32 boxes there: equal to 1e-6)."""
    from torchmetrics.detection import MeanAveragePrecision

    truth = random_truth(4)
    detections = jittered(truth, 4, seed=4, integer=False)
    metric = MeanAveragePrecision(backend="faster_coco_eval")
    metric.update(
        [{"boxes": b.float(), "scores": s.float(), "labels": k} for b, s, k in detections],
        [{"boxes": b.float(), "labels": k, "iscrowd": d.long()} for b, k, d in truth],
    )
    records = records_of(list(zip(detections, truth, strict=True)), classes="abcd")
    assert own(records)["coco_map"] == pytest.approx(float(metric.compute()["map"]), abs=1e-6)


def test_written_and_read_back_whole(tmp_path):
    truth = random_truth(5, n_images=6)
    detections = jittered(truth, 4, seed=5, integer=True)
    records = records_of(
        list(zip(detections, truth, strict=True)), Judging(0.3, "voc_inclusive_pixels", 0.4), "wxyz"
    )
    write_records(records, tmp_path / "records")
    again = read_records(tmp_path / "records")
    assert (again.kind, again.classes, again.judging, again.dataset_dir) == (
        "multi",
        list("wxyz"),
        Judging(0.3, "voc_inclusive_pixels", 0.4),
        "data",
    )
    for name in ("images", "objects"):
        pd.testing.assert_frame_equal(
            getattr(again, name), getattr(records, name), check_dtype=False
        )
    columns = [c for c in records.detections if c != "coco"]
    pd.testing.assert_frame_equal(
        again.detections[columns], records.detections[columns], check_dtype=False
    )
    assert [list(c) for c in again.detections["coco"]] == [
        list(c) for c in records.detections["coco"]
    ]
    assert own(again) == own(records)
    info = json.loads((tmp_path / "records/records.json").read_text())
    assert info["format"] == 1 and info["iou_threshold"] == 0.3


def test_restricted_keeps_the_images_asked_in_their_order():
    a, b = [0, 0, 10, 10], [20, 20, 40, 40]
    records = records_of(
        [image([a], [0.9], [a]), image([b, a], [0.8, 0.7], [b]), image([], [], [a])]
    )
    part = records.restricted(["im2", "im1"])
    assert part.images["image_id"].tolist() == ["im2", "im1"]
    assert part.detections["image_id"].tolist() == ["im1", "im1"]
    assert part.detections["score"].tolist() == [0.8, 0.7]
    assert part.objects["image_id"].tolist() == ["im2", "im1"]
    detections, truth = part.pairs()
    assert [len(d[1]) for d in detections] == [0, 2] and [len(t[1]) for t in truth] == [1, 1]
    assert torch.equal(detections[1][0], torch.tensor([b, a], dtype=torch.float64))


def test_unreadable_records_are_refused_naming_the_file(tmp_path):
    with pytest.raises(PipelineError, match="records.json not found"):
        read_records(tmp_path / "nothing")
    records = records_of([image([[0, 0, 10, 10]], [0.9], [[0, 0, 10, 10]])])
    folder = tmp_path / "records"
    write_records(records, folder)
    info = json.loads((folder / "records.json").read_text())
    (folder / "records.json").write_text(json.dumps(info | {"format": 2}))
    with pytest.raises(PipelineError, match="format 2.*this version reads format 1"):
        read_records(folder)
    (folder / "records.json").write_text(json.dumps(info))
    (folder / "detections.parquet").write_bytes(b"not parquet")
    with pytest.raises(PipelineError, match="detections.parquet: cannot read"):
        read_records(folder)
    (folder / "records.json").write_text("{")
    with pytest.raises(PipelineError, match="not valid JSON"):
        read_records(folder)


def test_an_evaluation_without_any_detection_is_written_and_scores_zero(tmp_path):
    """A head that scores nothing above the threshold: empty tables of the right types, mAP 0."""
    records = records_of([image([], [], [[0, 0, 10, 10]]), image([], [], [])])
    assert len(records.detections) == 0 and len(records.objects) == 1
    write_records(records, tmp_path / "records")
    again = read_records(tmp_path / "records")
    assert len(again.detections) == 0 and list(again.detections) == list(records.detections)
    assert own(again) == {"map": 0.0, "coco_map": 0.0}
