"""Export: a registered model -> four ONNX graphs, the tokenizer files and `manifest.json`, verified.

    graphs.py         the export wrappers around the PyTorch stages, their sample inputs and dynamic shapes
    onnx_export.py    one graph through torch.onnx.export(dynamo=True)
    pruning_choice.py which strategy ppm.onnx holds (the trained PPM, the bundled one, or a fallback)
    exporter.py       export into a directory, atomically
    verify.py         stage-by-stage parity against PyTorch, and the shipped Pipeline's tokens
    cli.py            `python export.py` (also `covipal-export`)
"""
