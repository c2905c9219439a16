"""Tiny video data sets on disk, in each layout the readers accept, for tests, demos and benchmarks.

Videos are real encoded files written with PyAV. Frame ``i`` of every video is a flat grey of level
:func:`frame_level` (``i``) with a class-coloured bar along its top, so a reader's output tells which frames
it decoded and which class it came from. On request a set also holds a corrupt video (random bytes under
a video name) and, in the frame-folder layout, an unreadable frame (a JPEG cut short).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from prism_vfm.video.data.lists import VideoSample, write_label_csv, write_video_list

LAYOUTS = ("ucf101", "hmdb51", "k400", "ssv2", "frames")
CODECS = {"h264": ("libx264", ".mp4"), "mpeg4": ("mpeg4", ".avi"), "vp9": ("libvpx-vp9", ".webm")}
LAYOUT_CODECS = {"ucf101": "mpeg4", "hmdb51": "mpeg4", "k400": "h264", "ssv2": "vp9"}
"""The released files' formats: AVI (MPEG-4 Part 2) for UCF101 and HMDB51, MP4 (H.264), WebM (VP9)."""
LEVEL_STEP = 8


def frame_level(i: int) -> int:
    """Grey level of frame ``i`` (distinct for the first 28 frames, robust to lossy coding)."""
    return 16 + (LEVEL_STEP * i) % 224


def synthetic_frames(
    num_frames: int, size: tuple[int, int], label: int = 0, noise_seed: int | None = None
) -> np.ndarray:
    """``(num_frames, H, W, 3)`` uint8 frames: grey level per frame, a bar of the class colour on top.

    ``noise_seed`` adds moving smooth texture, so a codec has realistic work to do (benchmarks).
    """
    height, width = size
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    colour = np.array([(60 * label) % 256, (110 * label + 40) % 256, (170 * label + 80) % 256], np.uint8)
    texture = None
    if noise_seed is not None:
        rng = np.random.default_rng(noise_seed)
        coarse = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2 + num_frames, 3), dtype=np.uint8)
        texture = np.asarray(
            Image.fromarray(coarse).resize(
                (coarse.shape[1] * 8, coarse.shape[0] * 8), Image.Resampling.BILINEAR
            )
        )
    for i in range(num_frames):
        if texture is not None:
            frames[i] = texture[:height, i : i + width]
        else:
            frames[i] = frame_level(i)
        frames[i, : max(1, height // 8)] = colour
    return frames


def write_video(
    path: str | os.PathLike[str],
    frames: np.ndarray,
    codec: str = "mpeg4",
    fps: int = 25,
    faststart: bool = False,
) -> Path:
    """Encode ``(N, H, W, 3)`` uint8 frames to ``path`` with PyAV (``h264``, ``mpeg4`` or ``vp9``).

    ``faststart`` (MP4) puts the index before the frames, as streaming sites do.
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream(CODECS[codec][0], rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "mpeg4":
            stream.options = {"qscale": "2"}
        elif codec == "h264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_frame_folder(folder: str | os.PathLike[str], frames: np.ndarray) -> Path:
    """Write frames as ``folder/img_00001.jpg``, ... (the released template, numbered from 1)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(frames, start=1):
        Image.fromarray(array).save(folder / f"img_{i:05d}.jpg", quality=95)
    return folder


@dataclass(frozen=True)
class TinyVideoSet:
    """What :func:`write_tiny_video_dataset` wrote."""

    root: Path
    """Data root: list paths are relative to ``root / "videos"`` (``root / "frames"`` for frame folders)."""
    video_root: Path
    class_names: list[str]
    train: list[VideoSample]
    val: list[VideoSample]
    train_list: Path
    val_list: Path
    label_csv: Path
    corrupt: Path | None = None
    bad_frame: Path | None = None
    truncated: Path | None = None
    extra: dict[str, Path] = field(default_factory=dict)
    """The layout's published split or annotation files."""


def _class_name(layout: str, c: int) -> str:
    if layout == "ucf101":
        return f"Action{c:02d}"
    if layout == "ssv2":
        return f"Moving something {c} times"
    return f"action {c:02d}" if layout == "k400" else f"action_{c:02d}"


def write_tiny_video_dataset(
    root: str | os.PathLike[str],
    layout: str = "ucf101",
    n_classes: int = 3,
    per_class: int = 2,
    num_frames: int = 12,
    size: tuple[int, int] = (48, 64),
    codec: str | None = None,
    corrupt_video: bool = False,
    bad_frame: bool = False,
    truncated_video: bool = False,
    three_columns: bool = False,
) -> TinyVideoSet:
    """Write a tiny video data set of ``layout`` (:data:`LAYOUTS`) under ``root``.

    Every layout gets the released list files ``train.txt`` / ``val.txt`` (``path label``, or
    ``path num_frames label`` with ``three_columns``) and ``labels.csv``, plus its published split or
    annotation files: UCF101's ``ucfTrainTestlist/``, HMDB51's ``testTrainMulti_7030_splits/`` (three splits
    each), Kinetics' ``annotations/{train,val}.csv`` with flat ``<id>_<start>_<end>.mp4`` videos, SSv2's
    ``labels.json`` and ``something-something-v2-{train,validation}.json`` with flat ``<id>.webm`` videos.
    ``frames`` writes class-folder frame folders instead of video files. ``codec`` (``h264``, ``mpeg4``,
    ``vp9``) defaults to the data set's own (:data:`LAYOUT_CODECS`); Kinetics file names always end
    ``.mp4``. The first video of each class is
    in the validation split, the rest in training. ``corrupt_video`` adds a training entry whose file is
    random bytes; ``bad_frame`` (frame folders) cuts the third frame of the first training video short;
    ``truncated_video`` adds a training entry that is an MP4 (index first) cut at 60 % of its bytes, so it
    opens with its full frame count but its last frames do not decode (a broken download).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    root = Path(root)
    video_root = root / ("frames" if layout == "frames" else "videos")
    codec = codec or LAYOUT_CODECS.get(layout, "mpeg4")
    ext = CODECS[codec][1]
    names = [_class_name(layout, c) for c in range(n_classes)]
    train: list[VideoSample] = []
    val: list[VideoSample] = []
    extra: dict[str, Path] = {}
    for c, name in enumerate(names):
        for v in range(per_class):
            frames = synthetic_frames(num_frames, size, label=c)
            if layout in ("ucf101", "hmdb51", "frames"):
                stem = f"v_{name}_g{v + 1:02d}_c01" if layout == "ucf101" else f"{name}_clip{v}"
                rel = f"{name}/{stem}" + ("" if layout == "frames" else ext)
            elif layout == "k400":
                rel = f"yt{c:03d}{v:04d}_{10 * v:06d}_{10 * v + 10:06d}.mp4"
            else:
                rel = f"{1000 * c + v}{ext}"
            if layout == "frames":
                write_frame_folder(video_root / rel, frames)
            else:
                write_video(video_root / rel, frames, codec)
            (val if v == 0 else train).append(VideoSample(rel, c, num_frames if three_columns else None))
    corrupt = bad = None
    if corrupt_video:
        rel = f"corrupt0_000000_000010{ext}" if layout == "k400" else f"{names[0]}/corrupt{ext}"
        corrupt = video_root / rel
        corrupt.parent.mkdir(parents=True, exist_ok=True)
        corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
        train.append(VideoSample(rel, 0, num_frames if three_columns else None))
    truncated = None
    if truncated_video:
        rel = "truncated0_000000_000010.mp4" if layout == "k400" else f"{names[0]}/truncated.mp4"
        truncated = write_video(video_root / rel, synthetic_frames(num_frames, size), "mpeg4", faststart=True)
        data = truncated.read_bytes()
        truncated.write_bytes(data[: int(len(data) * 0.6)])
        train.append(VideoSample(rel, 0, num_frames if three_columns else None))
    if bad_frame:
        if layout != "frames":
            raise ValueError("bad_frame needs the 'frames' layout (an unreadable image in a frame folder)")
        bad = video_root / train[0].path / "img_00003.jpg"
        bad.write_bytes(bad.read_bytes()[:100])
    write_video_list(root / "train.txt", train)
    write_video_list(root / "val.txt", val)
    write_label_csv(root / "labels.csv", names)
    extra.update(_published_files(root, layout, names, train, val))
    return TinyVideoSet(
        root, video_root, names, train, val, root / "train.txt", root / "val.txt", root / "labels.csv",
        corrupt, bad, truncated, extra,
    )  # fmt: skip


def _published_files(
    root: Path, layout: str, names: list[str], train: list[VideoSample], val: list[VideoSample]
) -> dict[str, Path]:
    """The data set's own split/annotation files, describing the same train/val division (every split)."""
    if layout == "ucf101":
        d = root / "ucfTrainTestlist"
        d.mkdir(exist_ok=True)
        (d / "classInd.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(names)))
        for s in (1, 2, 3):
            (d / f"trainlist0{s}.txt").write_text("".join(f"{x.path} {x.label + 1}\n" for x in train))
            (d / f"testlist0{s}.txt").write_text("".join(f"{x.path}\n" for x in val))
        return {"split_dir": d}
    if layout == "hmdb51":
        d = root / "testTrainMulti_7030_splits"
        d.mkdir(exist_ok=True)
        for s in (1, 2, 3):
            for c, n in enumerate(names):
                rows = [f"{Path(x.path).name} 1\n" for x in train if x.label == c]
                rows += [f"{Path(x.path).name} 2\n" for x in val if x.label == c]
                (d / f"{n}_test_split{s}.txt").write_text("".join(rows))
        return {"split_dir": d}
    if layout == "k400":
        d = root / "annotations"
        d.mkdir(exist_ok=True)
        for subset, samples in (("train", train), ("val", val)):
            with (d / f"{subset}.csv").open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
                for x in samples:
                    yt, start, end = Path(x.path).stem.rsplit("_", 2)
                    w.writerow([names[x.label], yt, int(start), int(end), subset])
        return {"train_csv": d / "train.csv", "val_csv": d / "val.csv"}
    if layout == "ssv2":
        (root / "labels.json").write_text(json.dumps({n: str(i) for i, n in enumerate(names)}))
        for subset, samples in (("train", train), ("validation", val)):
            entries = [{"id": Path(x.path).stem, "template": names[x.label]} for x in samples]
            (root / f"something-something-v2-{subset}.json").write_text(json.dumps(entries))
        return {
            "labels_json": root / "labels.json",
            "train_json": root / "something-something-v2-train.json",
            "val_json": root / "something-something-v2-validation.json",
        }
    return {}
