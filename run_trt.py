"""`python run_trt.py IMAGE QUESTION [--engine-dir DIR] [--backend auto|trt|ort|torch] [--budget K] [--json]`.

Thin entry point (also the `covipal-run` command); the work is in `covipal_export.runtime`.
"""

from covipal_export.runtime.cli import console

if __name__ == "__main__":
    console()
