"""`python run_trt.py IMAGE QUESTION [--engine-dir DIR] [--backend auto|trt|ort|torch] [--budget K] [--json]`."""

from covipal.cli import run
from covipal_export.runtime.cli import main

if __name__ == "__main__":
    run(main)
