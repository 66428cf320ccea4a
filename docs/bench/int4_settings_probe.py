"""Probe: mini-llava int4 with blocks of 16, and with MatMulNBits' accuracy level 0, on 200 easy-VQA questions at
k=64, against the fp32 export's answers. Needs the bench's fp32 export (`python -m covipal_export.bench --model
mini-llava ...` writes engines/bench/mini-llava-fp32). Run: `.venv/bin/python docs/bench/int4_settings_probe.py`.
"""

import shutil
from pathlib import Path

from covipal.training.data import easy_vqa
from covipal_export.bench.pipeline_eval import compare
from covipal_export.export import quantize
from covipal_export.manifest import load_manifest
from covipal_export.runtime.pipeline import Pipeline

BASE = Path("engines/bench/mini-llava-fp32")
SETTINGS = (("blocks of 16, accuracy level 4", 16, 4), ("blocks of 32, accuracy level 0", 32, 0))

examples = easy_vqa.sample(easy_vqa.load_split("test"), 200, 0)
reference = compare(Pipeline.from_dir(BASE, backend="ort"), examples, 64, reference=False).pipeline_answers
for name, block, level in SETTINGS:
    out = Path("/tmp") / f"mini-llava-int4-probe-{block}-{level}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(BASE, out)
    quantize.ACCURACY_LEVEL = level  # the module's setting, for this probe only
    quantize.quantize_export(out, load_manifest(out), quantize.QuantOptions("int4", block=block))
    result = compare(Pipeline.from_dir(out, backend="ort"), examples, 64, reference=False)
    same = sum(a == b for a, b in zip(result.pipeline_answers, reference))
    print(f"int4, {name}: accuracy {100 * result.pipeline_accuracy:.1f} %, fp32's answer on {same / 2:.1f} %")
    shutil.rmtree(out)
