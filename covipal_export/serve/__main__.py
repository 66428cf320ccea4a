from covipal_export.serve.cli import console

console()
