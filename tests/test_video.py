"""`run_trt.py VIDEO QUESTION --every SECONDS` on a video made here from an easy-VQA frame, and camera batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import requires_mini
from PIL import Image

from covipal.cli import run as run_cli
from covipal_export.runtime import Pipeline
from covipal_export.runtime.cli import main
from covipal_export.runtime.video import sample_frames

av = pytest.importorskip("av", reason="needs PyAV (the `video` extra, installed by `make setup`)")

ROOT = Path(__file__).resolve().parents[1]
RED = np.asarray(Image.open(ROOT / "covipal" / "assets" / "easy-vqa-test-0.png").convert("RGB"))  # a red triangle
BLUE = np.ascontiguousarray(RED[..., ::-1])  # the same scene, red and blue swapped: a blue triangle
FPS, SECONDS = 5, 4


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """4 s at 5 fps (H.264 4:4:4: a 64-pixel frame keeps its colours): the triangle is red for 2 s, then blue."""
    path = tmp_path_factory.mktemp("video") / "shape.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS, options={"crf": "12"})
        stream.height, stream.width, stream.pix_fmt = *RED.shape[:2], "yuv444p"
        for i in range(FPS * SECONDS):
            frame = av.VideoFrame.from_ndarray(RED if i < FPS * SECONDS // 2 else BLUE, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: main(list(args)))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_sampled_frames_and_their_times(video):
    every_second = list(sample_frames(video, 1.0))
    assert [t for t, _ in every_second] == [0.0, 1.0, 2.0, 3.0]
    assert [t for t, _ in sample_frames(video, 0.5)] == [0.0, 0.6, 1.0, 1.6, 2.0, 2.6, 3.0, 3.6]  # frames at 0.2 s
    assert [t for t, _ in sample_frames(video, 0.3)][:4] == [0.0, 0.4, 0.6, 1.0]  # the first frame at or after
    frame = every_second[0][1]
    assert frame.shape == RED.shape and frame.dtype == np.uint8
    assert np.abs(frame.astype(int) - RED).mean() < 4  # H.264 4:4:4 at crf 12 keeps the pixels close


@requires_mini
def test_answers_change_at_the_right_time(capsys, video, mini_demo_export):
    engine = ("--engine-dir", str(mini_demo_export), "--max-new-tokens", "4")
    code, out, err = cli(capsys, str(video), "what color is the shape?", "--every", "1", *engine)
    assert code == 0, err
    assert out.splitlines() == ["[00:00.0] red", "[00:01.0] red", "[00:02.0] blue", "[00:03.0] blue"]
    code, out, err = cli(capsys, str(video), "what color is the shape?", "--every", "2", "--json", *engine)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [(r["time_s"], r["frame"], r["answer"]) for r in rows] == [(0.0, 0, "red"), (2.0, 1, "blue")]
    assert rows[0]["tokens_kept"] == 64 and rows[1]["timings_ms"]["vision_cache_misses"] == 1


@requires_mini
def test_cameras_are_one_batch(mini_demo_export):
    pipe = Pipeline.from_dir(mini_demo_export, backend="ort")
    question = "what color is the shape?"
    batch = pipe.generate([RED, BLUE], [question, question], max_new_tokens=4)
    assert batch.answers == ["red", "blue"]
    assert batch.answers == [pipe.generate(f, question, max_new_tokens=4).answer for f in (RED, BLUE)]


def test_bad_videos_are_one_line_and_exit_2(capsys, video, tmp_path):
    """Refused before any export is opened."""
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("not a video")
    engine = ("--engine-dir", str(tmp_path / "no-export"))
    for args, message in [((str(video), "What?", "--every", "0"), "expected a positive number of seconds, got 0"),
                          ((str(video), "What?", "--every", "soon"), "expected a number of seconds, got 'soon'"),
                          ((str(not_video), "What?"), f"cannot open video {not_video}: "),
                          ((str(tmp_path / "none.mp4"), "What?"), "video not found: "),
                          ((str(video), " ", "--every", "1"), "the question is empty"),
                          ((str(video), "What?", "--compare-unpruned"), "--compare-unpruned takes an image")]:
        code, out, err = cli(capsys, *args, *engine)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
