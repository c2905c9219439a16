"""Reading the sampled frames of one video: PyAV (the default), decord (optional) or a folder of images.

Every reader gives its frame count and, for a list of frame numbers, one RGB ``uint8`` array ``(H, W, 3)``
per number — or ``None`` where that frame cannot be decoded, so the caller decides the fallback and counts
it (:mod:`prism_vfm.video.data.dataset`). A file that cannot be opened raises :class:`VideoOpenError`.

PyAV decodes only as far as the last sampled frame and, where the next sampled frame lies more than
``seek_gap`` frames ahead, seeks to the key frame before it rather than decoding the frames between.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

DECODERS = ("pyav", "decord")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class VideoOpenError(RuntimeError):
    """A video (file or frame folder) that cannot be opened or holds no frames."""


class FrameSource(Protocol):
    """What the loader needs of an opened video."""

    num_frames: int

    def frames(self, indices: list[int]) -> list[np.ndarray | None]:
        """One RGB uint8 ``(H, W, 3)`` array per index (repeats allowed), ``None`` where undecodable."""
        ...

    def close(self) -> None:
        """Release the file."""
        ...


class PyAVVideo:
    """A video file read with PyAV (FFmpeg), decoding only up to the sampled frames."""

    def __init__(self, path: str | os.PathLike[str], seek_gap: int = 64, threads: int = 1) -> None:
        import av

        self.path = Path(path)
        self.seek_gap = seek_gap
        try:
            self._container = av.open(str(path))
            if not self._container.streams.video:
                raise VideoOpenError(f"{path}: no video stream")
            self._stream = self._container.streams.video[0]
            if threads != 1:  # FFmpeg's frame and slice threads; 0 lets it choose
                self._stream.thread_type = "AUTO"
                self._stream.thread_count = threads
            self.num_frames = self._stream.frames or self._count_packets()
        except VideoOpenError:
            raise
        except Exception as e:  # FFmpeg's errors on a broken file come in several classes
            raise VideoOpenError(f"{path}: cannot be opened ({type(e).__name__}: {e})") from e
        if self.num_frames < 1:
            raise VideoOpenError(f"{path}: holds no frames")
        rate = self._stream.average_rate or self._stream.guessed_rate
        tb = self._stream.time_base
        # Frame number <-> presentation time (constant frame rate); without both, decode sequentially.
        self._ticks = float(1 / (rate * tb)) if rate and tb else None
        self._start = self._stream.start_time or 0

    def _count_packets(self) -> int:
        n = sum(1 for p in self._container.demux(self._stream) if p.size > 0)
        self._container.seek(0)
        return n

    def _index(self, frame: Any, previous: int) -> int:
        if self._ticks is None or frame.pts is None:
            self._ticks = None  # a frame without a time stamp: count frames, and never seek in this file
            return previous + 1
        return round((frame.pts - self._start) / self._ticks)

    def frames(self, indices: list[int]) -> list[np.ndarray | None]:
        """The frames at ``indices``; ``None`` for those the file does not deliver."""
        wanted = sorted(set(indices))
        got: dict[int, np.ndarray] = {}
        decoder = self._container.decode(self._stream)
        pos = -1
        for target in wanted:
            if target in got:
                continue
            if target - pos > self.seek_gap and self._ticks is not None and pos >= 0:
                self._container.seek(
                    int(self._start + target * self._ticks),
                    stream=self._stream,
                    backward=True,
                    any_frame=False,
                )
                decoder = self._container.decode(self._stream)
            try:
                for frame in decoder:
                    pos = self._index(frame, pos)
                    if pos in wanted and pos not in got:
                        got[pos] = frame.to_ndarray(format="rgb24")
                    if pos >= target:
                        break
                else:
                    break  # end of stream: later frames are not there
            except Exception:  # a packet FFmpeg cannot decode: this and later frames are missing
                break
        return [got.get(i) for i in indices]

    def close(self) -> None:
        """Close the container."""
        self._container.close()


class DecordVideo:
    """A video file read with decord (optional; ``pip install decord``)."""

    def __init__(self, path: str | os.PathLike[str], threads: int = 1) -> None:
        try:
            import decord
        except ImportError as e:
            raise ImportError("decoder 'decord' needs `pip install decord` (or use decoder='pyav')") from e
        self.path = Path(path)
        try:
            self._reader = decord.VideoReader(str(path), num_threads=threads)
        except Exception as e:
            raise VideoOpenError(f"{path}: cannot be opened ({type(e).__name__}: {e})") from e
        self.num_frames = len(self._reader)
        if self.num_frames < 1:
            raise VideoOpenError(f"{path}: holds no frames")

    def frames(self, indices: list[int]) -> list[np.ndarray | None]:
        """The frames at ``indices`` in one batch; one by one (``None`` where failing) if the batch fails."""
        try:
            batch = self._reader.get_batch(indices).asnumpy()
            return list(batch)
        except Exception:
            out: list[np.ndarray | None] = []
            for i in indices:
                try:
                    out.append(self._reader[i].asnumpy())
                except Exception:
                    out.append(None)
            return out

    def close(self) -> None:
        """Drop the reader."""
        del self._reader


class FrameFolder:
    """A video stored as a folder of images, frames in file-name order (``img_00001.jpg``, ...)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise VideoOpenError(f"{path}: frame folder does not exist")
        self._files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        self.num_frames = len(self._files)
        if not self._files:
            raise VideoOpenError(f"{path}: frame folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")

    def frames(self, indices: list[int]) -> list[np.ndarray | None]:
        """The images at ``indices``; ``None`` for a file that does not decode."""
        out: list[np.ndarray | None] = []
        for i in indices:
            try:
                with Image.open(self._files[i]) as img:
                    out.append(np.asarray(img.convert("RGB")))
            except (OSError, ValueError):
                out.append(None)
        return out

    def close(self) -> None:
        """Nothing to release."""


def open_video(path: str | os.PathLike[str], decoder: str = "pyav", threads: int = 1) -> FrameSource:
    """Open a video file with ``decoder`` (``pyav`` or ``decord``), or a frame folder if ``path`` is one.

    ``threads`` is the decoder's thread count (0: the library chooses); the default 1 leaves parallelism to
    the data loader's workers, which is what keeps a loader of many workers from oversubscribing the CPU.
    """
    if Path(path).is_dir():
        return FrameFolder(path)
    if not Path(path).is_file():
        raise VideoOpenError(f"{path}: no such video file or frame folder")
    if decoder == "pyav":
        return PyAVVideo(path, threads=threads)
    if decoder == "decord":
        return DecordVideo(path, threads=threads)
    raise ValueError(f"unknown decoder {decoder!r}; expected one of {DECODERS}")
