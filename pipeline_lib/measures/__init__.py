"""Floor 2: pure measures of detections against the truth.

`metrics` (accuracy, IoU, one image's matching, VOC AP as the devkit computes it, AP by size,
confusion), `bootstrap` (draws of the images, intervals, paired changes), `records` (per-image
records and the headline figures they give on any draw), `errortypes` (TIDE's error split).
Nothing here knows a head or writes a report.
"""
