"""Floor 4: heads trained.

`loop` (the training loop every head shares: seeded, weight EMA, best epoch kept), `tasks`
(what a head trains on, asked of its kind: datasets, head, card), `finetuning` (backbone units
and a head trained end to end from augmented images).
"""
