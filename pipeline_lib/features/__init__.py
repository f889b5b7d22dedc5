"""Floor 2: images through a pretrained backbone into cached feature files.

`backbones` (trunks without their classifier, feature levels, units), `images` (decoding with
PIL's checks, the Dataset extraction reads), `devices` (device, decoding processes, precision,
the model function), `extraction` (the loop: images -> a feature file, streamed),
`featurefiles` (the safetensors layout, read whole or by row).
"""
