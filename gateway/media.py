"""H.264 MP4 encoding with the ffmpeg binary that imageio-ffmpeg ships.

Frames are piped to ffmpeg as they arrive (rawvideo rgb24 on stdin), so the file is
being written while upstream stages still produce frames.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import numpy as np

from videomesh.errors import InvalidArgument, VideomeshError

# VerifyWatermark decodes at most this many frames of an upload: 4 s at 24 fps, a whole clip of the
# default model. The mark is in every frame, so more frames add votes, not evidence; without a
# bound a tiny MP4 of thousands of frames costs minutes of CPU.
MAX_VERIFY_FRAMES = 96


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


class Mp4Writer:
    """Streams RGB frames into an H.264 (yuv420p, faststart) MP4 that browsers play."""

    def __init__(
        self, path: Path, *, width: int, height: int, fps: float, crf: int = 18, preset: str = "veryfast"
    ):
        if width % 2 or height % 2:
            raise ValueError(f"yuv420p needs even sides; got {width}x{height}")
        self.path = Path(path)
        self.width, self.height = width, height
        self.frames = 0
        cmd = [
            ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", f"{fps:g}", "-i", "-",
            "-an", "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
            "-movflags", "+faststart", "-f", "mp4", str(self.path),
        ]  # fmt: skip
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        self._err = b""
        self._err_thread = threading.Thread(target=self._drain, daemon=True)
        self._err_thread.start()

    def _drain(self):
        self._err = self._proc.stderr.read()

    def write(self, frame: np.ndarray) -> None:
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(
                f"frame must be ({self.height}, {self.width}, 3) uint8; got {frame.shape} {frame.dtype}"
            )
        try:
            self._proc.stdin.write(np.ascontiguousarray(frame).tobytes())
        except BrokenPipeError as err:
            self._proc.wait()
            self._err_thread.join()
            raise VideomeshError(f"ffmpeg stopped: {self._err.decode(errors='replace')[-500:]}") from err
        self.frames += 1

    def close(self) -> None:
        self._proc.stdin.close()
        rc = self._proc.wait()
        self._err_thread.join()
        if rc != 0:
            raise VideomeshError(f"ffmpeg failed ({rc}): {self._err.decode(errors='replace')[-500:]}")

    def abort(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.path.unlink(missing_ok=True)


def probe(path: Path) -> dict:
    """Decode an MP4 with OpenCV: frame count, fps, size (used by tests and the CLI)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        frames = 0
        while True:
            ok, _ = cap.read()
            if not ok:
                break
            frames += 1
        return {
            "frames": frames,
            "fps": cap.get(cv2.CAP_PROP_FPS),
            "width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
            "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        }
    finally:
        cap.release()


def _check_size(width: int, height: int, max_size: tuple[int, int], field: str) -> None:
    max_w, max_h = max_size
    if width > max_w or height > max_h:
        raise InvalidArgument(
            f"video frames are {width}x{height}, larger than the limit of {max_w}x{max_h}", field=field
        )


def iter_frames(
    path: Path,
    *,
    max_frames: int | None = None,
    max_size: tuple[int, int] | None = None,
    field: str = "video",
):
    """Decode a video frame by frame (RGB uint8), without holding it all.

    Bounds for untrusted files: decoding stops after `max_frames` frames, and a stream whose
    frames are larger than `max_size` (width, height) raises InvalidArgument(field=field) before
    any frame is decoded (from the stream's header), or at the first larger frame should the size
    change mid-stream.
    """
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        if max_size is not None:
            w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
            _check_size(w, h, max_size, field)
        n = 0
        while max_frames is None or n < max_frames:
            ok, frame = cap.read()
            if not ok:
                return
            if max_size is not None:
                _check_size(frame.shape[1], frame.shape[0], max_size, field)
            n += 1
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()


def read_frames(path: Path) -> np.ndarray:
    """All frames of a video as (T, H, W, 3) uint8 RGB."""
    frames = list(iter_frames(path))
    return np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)
