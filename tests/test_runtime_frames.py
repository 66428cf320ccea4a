"""Frames as input (arrays RGB/BGR, bytes, PIL, tensors, DLPack) and the vision cache, on tiny-random-llava."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covipal.errors import CovipalError
from covipal_export.runtime import Pipeline
from covipal_export.runtime.vision_cache import VisionCache

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "covipal" / "assets" / "easy-vqa-test-0.png"
QUESTION = "What is in the picture?"
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def pipe(tiny_export) -> Pipeline:
    return Pipeline.from_dir(tiny_export, backend="ort", threads=1, vision_cache_mb=0)


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.asarray(Image.open(IMAGE).convert("RGB"))  # [H, W, 3] uint8


def tokens(pipe: Pipeline, image, **options) -> list[int]:
    return pipe.generate(image, QUESTION, max_new_tokens=NEW_TOKENS, ignore_eos=True, **options).sequences[0].tolist()


class DLPackFrame:
    """A foreign array (CuPy, JAX, ...): only __dlpack__ / __dlpack_device__."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __dlpack__(self, **kwargs):
        return self.tensor.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.tensor.__dlpack_device__()


def test_every_frame_form_gives_the_file_answer(pipe, rgb):
    want = tokens(pipe, str(IMAGE))
    bgr = np.ascontiguousarray(rgb[..., ::-1])  # what cv2.imread / cv2.VideoCapture give
    forms = {"path": IMAGE, "png bytes": IMAGE.read_bytes(), "bytearray": bytearray(IMAGE.read_bytes()),
             "pil": Image.open(IMAGE), "rgb array": rgb, "rgb view": rgb[::1, ::1],
             "tensor": torch.from_numpy(rgb.copy()), "dlpack": DLPackFrame(torch.from_numpy(rgb.copy()))}
    for name, image in forms.items():
        assert tokens(pipe, image) == want, name
    assert tokens(pipe, bgr, color="bgr") == want
    assert tokens(pipe, torch.from_numpy(bgr), color="bgr") == want
    swapped = pipe.processor([bgr], [QUESTION]).pixel_values  # BGR passed as RGB: a caller error (test_runtime_mini)
    assert not torch.equal(swapped, pipe.processor([rgb], [QUESTION]).pixel_values)


def test_jpeg_bytes_are_the_decoded_jpeg(pipe, rgb):
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    assert tokens(pipe, buffer.getvalue()) == tokens(pipe, decoded)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensor_frames(pipe, rgb):
    assert tokens(pipe, torch.from_numpy(rgb).cuda()) == tokens(pipe, rgb)


def test_bad_frames_are_one_clear_error(pipe, rgb):
    jpeg = io.BytesIO()
    Image.fromarray(rgb).save(jpeg, format="JPEG")
    cases = [
        (np.zeros((0, 32, 3), np.uint8), r"an image array must have shape \[H, W, 3\], got \[0, 32, 3\] \(empty\)"),
        (rgb.astype(np.float32) / 255, "an image array must be uint8 \\(0..255\\), got float32"),
        (rgb[..., :2], r"must have shape \[H, W, 3\], got \[\d+, \d+, 2\] \(2 channels; 3 are RGB or BGR\)"),
        (np.zeros((8, 8, 5), np.uint8), r"got \[8, 8, 5\] \(5 channels"),
        (torch.zeros(8, 8, 3), "an image tensor must be uint8 \\(0..255\\), got float32"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), r"an image tensor must have shape \[H, W, 3\], got \[3, 8, 8\]"),
        (jpeg.getvalue()[:300], r"cannot read image 300 image bytes: "),
        (b"", "cannot decode image bytes: there are none"),
        (b"not an image", "cannot read image 12 image bytes: cannot identify image file"),
    ]
    for image, message in cases:
        with pytest.raises(CovipalError, match=message):
            pipe.generate(image, QUESTION, max_new_tokens=2)
    with pytest.raises(CovipalError, match="color must be one of rgb, bgr, got 'rgba'"):
        pipe.generate(rgb, QUESTION, max_new_tokens=2, color="rgba")


def test_vision_cache_skips_the_encoder_with_the_same_answers(tiny_export, pipe, images, questions):
    cached = Pipeline.from_dir(tiny_export, backend="ort", threads=1)  # on by default
    many = [f"{q} ({i})" for i in range(3) for q in questions]  # 9 questions about one frame
    counts = []
    for question in many:
        result = cached.generate(images[0], question, max_new_tokens=NEW_TOKENS)
        counts.append((result.timings_ms.vision_cache_hits, result.timings_ms.vision_cache_misses))
        assert result.sequences.tolist() == pipe.generate(images[0], question,
                                                          max_new_tokens=NEW_TOKENS).sequences.tolist()
    assert counts == [(0, 1)] + [(1, 0)] * 8
    # a batch: cached rows looked up, the others encoded once each (two cameras on one frame: one encoder run)
    batch = cached.generate([images[0], images[1], images[1]], questions, max_new_tokens=NEW_TOKENS)
    assert (batch.timings_ms.vision_cache_hits, batch.timings_ms.vision_cache_misses) == (2, 1)
    uncached = pipe.generate([images[0], images[1], images[1]], questions, max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(batch.sequences, uncached.sequences)
    assert batch.to_json()["timings_ms"]["vision_cache_hits"] == 2
    off = pipe.generate(images[0], QUESTION, max_new_tokens=1).timings_ms  # vision_cache_mb=0: off
    assert (off.vision_cache_hits, off.vision_cache_misses, len(pipe.vision_cache)) == (0, 1, 0)


def test_vision_cache_is_bounded_in_bytes_least_recently_used_out():
    row = torch.zeros(4, 256)  # 4 KiB of visual tokens per frame
    cache = VisionCache(max_mb=10 * 4096 / 2**20)  # room for 10
    runs = []

    def encoder(pixels):
        runs.append(len(pixels))
        return pixels.mean(dim=(1, 2, 3))[:, None, None] + row

    frames = [torch.full((1, 3, 2, 2), float(i)) for i in range(12)]
    for frame in frames:
        cache.encode(frame, encoder)
    assert (len(cache), cache.nbytes) == (10, 10 * 4096)
    visual, counts = cache.encode(frames[5], encoder)  # still held
    assert (counts.hits, counts.misses) == (1, 0) and float(visual[0, 0, 0]) == 5.0
    _, counts = cache.encode(frames[0], encoder)  # the least recently used ones went first
    assert (counts.hits, counts.misses) == (0, 1)
    assert len(runs) == 13
