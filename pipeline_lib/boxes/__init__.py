"""Floor 1: boxes, their formats and their codings, as pure functions on tensors.

`geometry` (ImageSpec, image modes, pixels <-> image fractions), `gridcoding` (fractions <->
grid cell boxes, the raw outputs' coding), `anchors` (shape IoU, k-means priors, best anchor),
`detection` (a head's outputs -> scored boxes in the photo's pixels, NMS). Each coding lives
beside its inverse; nothing here reads a file or knows a head.
"""
