"""`python -m covipal.train`: the PPM training command; its code is in covipal.training.train_ppm."""

from covipal.cli import run
from covipal.training.train_ppm import main

if __name__ == "__main__":
    run(main)
