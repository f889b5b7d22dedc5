"""Floor 1: datasets in, the prepared tables out.

`voc` (PASCAL VOC XML, the VOC2012 download), `coco` (COCO JSON, VOC -> COCO), `synthetic`
(the embedded dataset in VOC layout), `sources` (which reader `data.source` names), `tables`
(the Parquet schemas, `Prepared`, per-split summaries). Annotation rules and the confinement of
file names written inside annotations belong here.
"""
