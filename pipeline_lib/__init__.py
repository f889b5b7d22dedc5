"""The library behind the stages: nothing here knows DVC or Typer.

Its packages are floors; a module imports from its own package and from floors below, never
from a floor above or a package beside it on the same floor (tests/test_layers.py holds it):

    5  evaluation  a trained model measured (the evaluate stages' reports) and used (predict)
    4  training    the training loop, a head's training task, fine-tuning end to end
    3  models      model cards, targets, losses, the heads, their registry, model files
    3  reporting   figures, and the review of what changed between two revisions
    2  features    backbones, image decoding, devices, the extraction loop, feature files
    2  measures    matching, AP, the bootstrap, per-image records, TIDE's error types
    1  boxes       box formats and their codings (grid cells, anchors), decoding to detections
    1  data        dataset readers (VOC, COCO, synthetic) and the prepared Parquet tables
    0  base        errors, atomic files, params, processes (torchrun)

docs/architecture.md maps every module.
"""
