"""Floor 3: what a head is, learns and is saved as.

`modelcard` (the typed description every model file carries), `targets` (what a head learns per
image), `losses` (the losses, their weights and the `Objective` a head hands the loop), `heads`
(the grid and single-object heads), `torchvision_heads`, `fcos`, `retinanet` (torchvision's
detectors on the cached levels), `headkinds` (the one registry of head kinds), `checkpoints`
(model files saved and rebuilt from their card). A new head is a module here and a registry line.
"""
