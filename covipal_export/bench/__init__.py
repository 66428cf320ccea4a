"""Bench: how fast and how accurate an export is, measured side by side.

    cli.py            `python -m covipal_export.bench` (also `covipal-bench`): latency and memory per (backend,
                      budget), interleaved, one worker process per backend
    worker.py         one backend's process: the shipped Pipeline timed call by call, its peak memory
    report.py         medians, ratios, tables and the plot
    pipeline_eval.py  `python -m covipal_export.bench.pipeline_eval` (also `covipal-pipeline-eval`): easy-VQA
                      accuracy of an export through the Pipeline, against covipal.eval
"""
