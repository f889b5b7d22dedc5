"""The stage scripts: a Typer command line each (`python -m stages.NAME`) over pipeline_lib.

Starting fast: a stage imports torch and torchvision (and with them torch._dynamo, millions of
objects) before it does anything, and Python's cyclic garbage collector would walk those objects
again and again while they load, in every full collection after, and once more at exit: 1.6 s of a
4.6 s start on 2 cores with AVX-512 BF16 (docs/testing.md, "How long"). So a stage run as a program
collects nothing while its modules load (`python -m` imports this package with sys.argv[0] set to
"-m"), and common.main freezes what the imports made (gc.freeze: modules live as long as the
process) before it turns the collector back on. Imported by a test or a notebook, this package
changes nothing.
"""

import gc
import sys

if sys.argv[:1] == ["-m"]:
    gc.disable()
