from covipal_export.triton.cli import console

console()
