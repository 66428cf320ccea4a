"""`python -m covipal_export.bench`: see covipal_export.bench.cli."""

from covipal_export.bench.cli import console

console()
