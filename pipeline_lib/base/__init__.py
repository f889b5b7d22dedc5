"""Floor 0: what every other floor may use, and which uses nothing of the library.

`errors` (PipelineError: bad input, reported as one line), `files` (atomic writes), `params`
(params.yaml typed and validated, the rules that combine keys), `distributed` (torchrun's ranks,
shares and sums). Nothing about images, boxes or models belongs here.
"""
