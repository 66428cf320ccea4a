"""Frames sampled from a video file (PyAV, FFmpeg's libraries), for `run_trt.py VIDEO QUESTION --every SECONDS`.

    sample_frames(path, every)  -> (seconds, frame [H, W, 3] uint8 RGB), the first frame at or after
                                   0, every, 2 * every, ... (decoded in order; frames between are skipped)
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from covipal.errors import CovipalError

SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".ts")


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SUFFIXES


def sample_frames(path: str | Path, every: float) -> Iterator[tuple[float, np.ndarray]]:
    """One RGB frame per `every` seconds of the video's first video stream; one-line errors for what does not open."""
    if not every > 0:
        raise CovipalError(f"--every must be a positive number of seconds, got {every:g}")
    path = Path(path)
    if not path.is_file():
        raise CovipalError(f"video not found: {path}")
    try:
        import av
    except ImportError:
        raise CovipalError("reading videos needs PyAV: pip install 'covipal-export[video]' (or `make setup`)") from None
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise CovipalError(f"cannot open video {path}: {exc}") from None
    with container:
        if not container.streams.video:
            raise CovipalError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        due = 0.0
        try:
            for frame in container.decode(stream):
                seconds = float(frame.time or 0.0)
                if seconds + 1e-6 >= due:
                    yield seconds, frame.to_ndarray(format="rgb24")  # [H, W, 3] uint8
                    due = (int((seconds + 1e-6) / every) + 1) * every
        except av.FFmpegError as exc:
            raise CovipalError(f"cannot decode video {path}: {exc}") from None
