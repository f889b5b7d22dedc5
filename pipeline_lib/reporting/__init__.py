"""Floor 3: what people look at.

`plots` (matplotlib figures without pyplot state, a PR column wide), `review` (what changed
between two revisions or groups of runs: judged figures, error types, moved images, Markdown).
"""
