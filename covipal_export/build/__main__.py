"""`python -m covipal_export.build DIR`: see covipal_export.build.cli."""

from covipal_export.build.cli import console

console()
