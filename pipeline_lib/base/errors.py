"""The base of every error that means "your input or set-up is wrong", not "the code is wrong".

Stage scripts print these as one `error: ...` line and exit 1; anything else keeps its traceback.
"""


class PipelineError(Exception):
    """Bad params, data, images or weights; the message names the key or file at fault."""
