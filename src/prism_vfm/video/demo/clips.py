"""Procedural video clips for the VidPrism demo: shapes that move, scale, fade, blink and spin.

A clip is ``NUM_FRAMES`` (32) frames of ``FRAME_SIZE`` (32) pixels square, rendered in numpy in a few
milliseconds. Its label is ``(shape, motion)``: one of :data:`SHAPES` in one of :data:`COLOURS` (colour,
size, position, orientation and background vary from clip to clip) doing one of :data:`MOTIONS`. The
motions are chosen so that every part of VidPrism is needed by some class:

- ``still`` against everything else: motion at all;
- translation (left / right / up / down), scale (growing / shrinking) and visibility (appearing /
  disappearing): each a *reversal pair* (:data:`REVERSAL_PAIRS`) — the second clip of a pair is the first's
  frames in reverse order, so only the order of frames tells them apart;
- ``blinking quickly`` / ``blinking slowly`` (:data:`BLINK_PAIR`): the same on-fraction with periods of 4
  and 16 frames, so only the time scale tells them apart (the released rates give streams of 16/8/4/2
  frames of a 32-frame clip; a period-4 blink aliases away in the slow streams);
- ``spinning``: a change of orientation (the circle carries an off-centre dot and the ring a gap so that
  every shape shows it).

:data:`CONTROL_MOTION` (``wobbling``) is a thirteenth motion never used in video training: a zero-shot
control that should stay near chance.

Every frame also has a :class:`FrameState` — shape, colour, size word, position word, brightness word and
a single-frame state word — whose :meth:`FrameState.caption` ("a faint small red star moving left in the
east") is what the demo's image-text model is trained on.

API (stable): :func:`render_clip`, :func:`class_name`, :func:`demo_splits` / :class:`DemoSplits`,
:func:`write_demo_dataset` / :class:`DemoDataset`, and the constants above.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from prism_vfm.video.data.lists import VideoSample, write_label_csv, write_video_list
from prism_vfm.video.data.synthetic import CODECS, write_video

NUM_FRAMES = 32
# Raised whenever what a seed renders changes, so cached models trained on older frames are not reused.
RENDERER_VERSION = 2
FRAME_SIZE = 32

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond", "star", "bar")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 45, 40),
    "green": (40, 200, 70),
    "blue": (50, 100, 245),
    "yellow": (240, 220, 40),
}
MOTIONS: tuple[str, ...] = (
    "still",
    "moving left",
    "moving right",
    "moving up",
    "moving down",
    "growing",
    "shrinking",
    "appearing",
    "disappearing",
    "blinking quickly",
    "blinking slowly",
    "spinning",
)
CONTROL_MOTION = "wobbling"
"""Rotating back and forth: known to the image-text model's captions, never a video-training class."""
ALL_MOTIONS: tuple[str, ...] = (*MOTIONS, CONTROL_MOTION)

MOTION_GROUPS: dict[str, tuple[str, ...]] = {
    "static": ("still",),
    "translation": ("moving left", "moving right", "moving up", "moving down"),
    "scale": ("growing", "shrinking"),
    "visibility": ("appearing", "disappearing"),
    "blink": ("blinking quickly", "blinking slowly"),
    "rotation": ("spinning",),
}
"""The 12 video motions by the mechanism they need (the control motion is in none)."""

REVERSAL_PAIRS: tuple[tuple[str, str], ...] = (
    ("moving right", "moving left"),
    ("moving down", "moving up"),
    ("growing", "shrinking"),
    ("appearing", "disappearing"),
)
"""(rendered, reversed): the second motion's clip is the first's frames in reverse order (same seed)."""

BLINK_PAIR: tuple[str, str] = ("blinking quickly", "blinking slowly")
BLINK_PERIODS: dict[str, int] = {"blinking quickly": 4, "blinking slowly": 16}
"""Frames per on/off cycle; both are on for half of it."""

_REVERSED = {second: first for first, second in REVERSAL_PAIRS}
_SUPERSAMPLE = 2  # shapes are drawn at twice the resolution and averaged down (anti-aliasing)


# --------------------------------------------------------------------------------------------- words
def size_word(radius: float) -> str:
    """``small`` / ``medium`` / ``large`` for a shape's radius in pixels of a 32-pixel frame."""
    return "small" if radius < 4.5 else "medium" if radius < 7.0 else "large"


def position_word(x: float, y: float, size: int = FRAME_SIZE) -> str:
    """Where the centre ``(x, y)`` lies on a 3×3 grid: ``in the centre``, ``in the north-east``, ..."""
    col = ("west", "", "east")[min(2, int(3 * x / size))]
    row = ("north", "", "south")[min(2, int(3 * y / size))]
    place = "-".join(w for w in (row, col) if w) or "centre"
    return f"in the {place}"


def brightness_word(alpha: float) -> str:
    """``invisible`` / ``faint`` / ``bright`` for a shape's opacity."""
    return "invisible" if alpha < 0.05 else "faint" if alpha < 0.6 else "bright"


@dataclass(frozen=True)
class FrameState:
    """What one frame shows: the words of its caption and the numbers they come from."""

    shape: str
    colour: str
    motion: str
    x: float
    y: float
    radius: float
    angle: float
    """Orientation in degrees."""
    alpha: float
    """Opacity in [0, 1]."""

    @property
    def size(self) -> str:
        return size_word(self.radius)

    @property
    def position(self) -> str:
        return position_word(self.x, self.y)

    @property
    def brightness(self) -> str:
        return brightness_word(self.alpha)

    @property
    def state(self) -> str | None:
        """The motion as a single frame shows it, where it can: a rotating shape is ``upright`` or
        ``tilted`` (within 15° of its rest orientation or not). Translation, scale and visibility show as
        the position, size and brightness words instead; a frame cannot show a direction or a period."""
        if self.motion in ("spinning", CONTROL_MOTION):
            off = (self.angle + 180.0) % 360.0 - 180.0
            return "upright" if abs(off) < 15.0 else "tilted"
        return None

    def caption(self, keep: Sequence[str] | None = None) -> str:
        """The caption, e.g. "a faint small red star moving left in the east".

        ``keep``: the attributes to say, among ``brightness``, ``size``, ``state``, ``colour``, ``motion``,
        ``position`` (default all); the shape is always said. An invisible shape is "an empty scene".
        """
        if self.brightness == "invisible":
            return "an empty scene"
        say = set(keep) if keep is not None else set(CAPTION_ATTRIBUTES)
        words = ["a"]
        for attr in ("brightness", "size", "state", "colour"):
            value = getattr(self, attr)
            if attr in say and value:
                words.append(value)
        words.append(self.shape)
        if "motion" in say:
            words.append(self.motion)
        if "position" in say:
            words.append(self.position)
        return " ".join(words)


CAPTION_ATTRIBUTES = ("brightness", "size", "state", "colour", "motion", "position")


def class_name(shape: str, motion: str) -> str:
    """The class as text for text classifiers: ``"a star moving left"`` (colour varies within a class)."""
    return f"a {shape} {motion}"


# ------------------------------------------------------------------------------------------ rendering
def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inside, dark) boolean masks of ``shape`` in its own coordinates (radius 1, pointing along +u);
    ``dark`` marks the circle's off-centre dot."""
    r = np.hypot(u, v)
    dark = np.zeros(u.shape, bool)
    if shape == "circle":
        inside = r <= 1.0
        dark = np.hypot(u - 0.5, v) <= 0.32
    elif shape == "square":
        inside = np.maximum(np.abs(u), np.abs(v)) <= 0.8
    elif shape == "triangle":  # apex along +u
        inside = (u >= -0.5) & (np.abs(v) <= (1.0 - u) / np.sqrt(3.0))
    elif shape == "cross":
        inside = ((np.abs(u) <= 1.0) & (np.abs(v) <= 0.3)) | ((np.abs(v) <= 1.0) & (np.abs(u) <= 0.3))
    elif shape == "ring":  # with a gap along +u, so that its rotation shows
        inside = (r <= 1.0) & (r >= 0.55) & ~((u > 0) & (np.abs(v) <= 0.25))
    elif shape == "diamond":  # a rhombus, so that no orientation makes it a square
        inside = np.abs(u) + np.abs(v) / 0.6 <= 1.0
    elif shape == "star":
        theta = np.arctan2(v, u)
        inside = r <= 0.42 + 0.58 * ((np.cos(5 * theta) + 1) / 2) ** 2
    elif shape == "bar":
        inside = (np.abs(u) <= 1.0) & (np.abs(v) <= 0.28)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return inside, dark & inside


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dull noisy background: a tinted grey gradient and pixel noise (float, 0–255). Blotchy texture
    would make the shapes much slower to learn for the demo's tiny ViT (not for a CNN)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(50, 110) + rng.uniform(-25, 25) * xx + rng.uniform(-25, 25) * yy
    tint = rng.uniform(-8, 8, 3)
    noise = rng.normal(0, 6, (size, size, 3))
    return base[..., None] + tint + noise


def _trajectory(motion: str, rng: np.random.Generator, t: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Per-frame centre, radius, angle and opacity of a motion (the first motion of a reversal pair)."""
    n = len(t)
    s = t / max(1, n - 1)  # 0 → 1 over the clip
    radius = np.full(n, rng.uniform(5.0, 8.0))
    angle = np.full(n, rng.uniform(0.0, 360.0))
    alpha = np.ones(n)
    if motion in ("moving right", "moving down"):
        radius[:] = rng.uniform(4.0, 6.0)
        r = radius[0]
        travel = rng.uniform(10.0, min(16.0, size - 2 * r - 2))
        start = rng.uniform(r + 1, size - r - 1 - travel)
        along = start + travel * s
        across = np.full(n, rng.uniform(r + 1, size - r - 1))
        x, y = (along, across) if motion == "moving right" else (across, along)
    else:
        if motion == "growing":
            radius = rng.uniform(2.5, 3.5) + (rng.uniform(8.5, 10.0) - 3.0) * s
        margin = radius.max() + 1
        x = np.full(n, rng.uniform(margin, size - margin))
        y = np.full(n, rng.uniform(margin, size - margin))
        if motion == "appearing":
            onset, ramp = rng.uniform(2.0, 10.0), rng.uniform(10.0, 16.0)
            alpha = np.clip((t - onset) / ramp, 0.0, 1.0)
        elif motion in BLINK_PERIODS:
            period = BLINK_PERIODS[motion]
            phase = rng.integers(period)
            alpha = (((t + phase) % period) < period // 2).astype(float)
        elif motion == "spinning":
            angle = angle + rng.choice([-1.0, 1.0]) * rng.uniform(9.0, 14.0) * t
        elif motion == CONTROL_MOTION:
            angle = angle + 40.0 * np.sin(2 * np.pi * t / 16.0 + rng.uniform(0, 2 * np.pi))
        elif motion not in ("still", "growing"):
            raise ValueError(f"unknown motion {motion!r}; expected one of {ALL_MOTIONS}")
    return {"x": x, "y": y, "radius": radius, "angle": angle, "alpha": alpha}


@dataclass
class Clip:
    """A rendered clip: ``frames`` ``(T, H, W, 3)`` uint8 and one :class:`FrameState` per frame."""

    frames: np.ndarray
    states: list[FrameState]
    shape: str
    colour: str
    motion: str
    seed: int


def render_clip(
    shape: str,
    motion: str,
    colour: str,
    seed: int,
    num_frames: int = NUM_FRAMES,
    size: int = FRAME_SIZE,
) -> Clip:
    """Render ``shape`` in ``colour`` doing ``motion``; every random choice comes from ``seed``.

    The second motion of a reversal pair is the first motion's clip of the same seed, reversed in time.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {tuple(COLOURS)}")
    if motion in _REVERSED:
        clip = render_clip(shape, _REVERSED[motion], colour, seed, num_frames, size)
        states = [FrameState(**{**vars(st), "motion": motion}) for st in reversed(clip.states)]
        return Clip(clip.frames[::-1].copy(), states, shape, colour, motion, seed)
    rng = np.random.default_rng(seed)
    background = _background(rng, size)
    t = np.arange(num_frames, dtype=float)
    path = _trajectory(motion, rng, t, size)
    flicker = rng.normal(0, 2.0, (num_frames, 1, 1, 1))  # camera gain noise, frame to frame

    # Shape coordinates on the supersampled grid, for every frame at once: (T, H·k, W·k).
    k = _SUPERSAMPLE
    grid = (np.arange(size * k) + 0.5) / k
    gx, gy = grid[None, None, :], grid[None, :, None]
    theta = np.deg2rad(path["angle"])[:, None, None]
    dx = (gx - path["x"][:, None, None]) / path["radius"][:, None, None]
    dy = (gy - path["y"][:, None, None]) / path["radius"][:, None, None]
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    inside, dark = _shape_mask(shape, u, v)

    def pool(mask: np.ndarray) -> np.ndarray:
        return mask.reshape(num_frames, size, k, size, k).mean(axis=(2, 4))[..., None]

    cover = pool(inside) * path["alpha"][:, None, None, None]
    shade = 1.0 - 0.75 * pool(dark) / np.maximum(pool(inside), 1e-6)
    colour_rgb = np.asarray(COLOURS[colour], float) * rng.uniform(0.85, 1.0)
    frames = background[None] * (1 - cover) + colour_rgb * shade * cover + flicker
    states = [
        FrameState(
            shape, colour, motion,
            float(path["x"][i]), float(path["y"][i]), float(path["radius"][i]),
            float(path["angle"][i] % 360.0), float(path["alpha"][i]),
        )
        for i in range(num_frames)
    ]  # fmt: skip
    return Clip(np.clip(np.rint(frames), 0, 255).astype(np.uint8), states, shape, colour, motion, seed)


# -------------------------------------------------------------------------------------------- splits
@dataclass(frozen=True)
class DemoSplits:
    """Which (shape, motion) classes the demo trains on and which it holds out for zero-shot tests.

    - ``video_classes``: the 48 classes of video training — ``video_shapes`` (5) × :data:`MOTIONS` (12),
      minus one held-out shape per motion;
    - ``tier1``: the 12 held-out pairs (shape and motion both seen in video training, never together);
    - ``tier2``: ``novel_shapes`` (3, never in a training video) × the 12 motions — their shape words are
      known only from image-text pretraining;
    - ``control``: the video shapes doing :data:`CONTROL_MOTION`, a motion no training video shows. Score
      its clips among ``control_candidates`` (every motion of the clip's shape): it should stay near
      chance.
    """

    video_shapes: tuple[str, ...]
    novel_shapes: tuple[str, ...]
    held_out: dict[str, str]
    """Motion → the video shape held out of training for it."""
    video_classes: list[tuple[str, str]]
    tier1: list[tuple[str, str]]
    tier2: list[tuple[str, str]]
    control: list[tuple[str, str]]
    control_candidates: list[tuple[str, str]]

    def names(self, classes: Sequence[tuple[str, str]]) -> list[str]:
        """Class names as text (:func:`class_name`)."""
        return [class_name(s, m) for s, m in classes]


def demo_splits(seed: int = 0) -> DemoSplits:
    """The class splits of ``seed``: which shapes are novel and which pair of each motion is held out."""
    rng = np.random.default_rng([seed, 1])
    order = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    video_shapes, novel_shapes = tuple(order[:5]), tuple(order[5:])
    offset = int(rng.integers(len(video_shapes)))
    held_out = {m: video_shapes[(i + offset) % len(video_shapes)] for i, m in enumerate(MOTIONS)}
    return DemoSplits(
        video_shapes=video_shapes,
        novel_shapes=novel_shapes,
        held_out=held_out,
        video_classes=[(s, m) for m in MOTIONS for s in video_shapes if s != held_out[m]],
        tier1=[(held_out[m], m) for m in MOTIONS],
        tier2=[(s, m) for s in novel_shapes for m in MOTIONS],
        control=[(s, CONTROL_MOTION) for s in video_shapes],
        control_candidates=[(s, m) for s in video_shapes for m in ALL_MOTIONS],
    )


def clip_seed(seed: int, split: str, shape: str, motion: str, index: int) -> int:
    """The render seed of clip ``index`` of class (shape, motion) in ``split`` (stable across versions of
    the class lists, so adding a class never changes another's clips)."""
    key = f"{seed}|{split}|{shape}|{motion}|{index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


# ------------------------------------------------------------------------------------------ data set
@dataclass(frozen=True)
class DemoDataset:
    """What :func:`write_demo_dataset` wrote under ``root`` (a flat folder with the released list files).

    ``root/videos/*.avi`` flat; ``train.txt`` / ``val.txt`` / ``test.txt`` (``path label``, paths
    relative to ``root/videos``) labelled in ``labels.csv`` (``id,name``, the 48 video classes); each
    zero-shot set (``tier1``, ``tier2``, ``control``) as ``zeroshot/<set>.txt`` labelled in
    ``zeroshot/<set>_labels.csv`` with a protocol file ``zeroshot/<set>.yaml`` for ``prism video
    zeroshot``; ``clips.csv`` gives every video's split, shape, colour, motion and render seed.
    """

    root: Path
    video_root: Path
    splits: DemoSplits
    class_names: list[str]
    lists: dict[str, Path]
    """``train``, ``val``, ``test``, ``tier1``, ``tier2``, ``control`` → list file."""
    label_csvs: dict[str, Path]
    """The same keys → label CSV (the three video splits share ``labels.csv``)."""
    protocols: dict[str, Path]
    """``tier1``, ``tier2``, ``control`` → zero-shot protocol file."""
    samples: dict[str, list[VideoSample]] = field(default_factory=dict)
    clips_csv: Path | None = None


def write_demo_dataset(
    root: str | os.PathLike[str],
    train_per_class: int = 16,
    val_per_class: int = 4,
    test_per_class: int = 4,
    zeroshot_per_class: int = 4,
    seed: int = 0,
    codec: str = "mpeg4",
) -> DemoDataset:
    """Render and encode the demo's clips under ``root`` (see :class:`DemoDataset` for the layout).

    Colours cycle through :data:`COLOURS` within each class. ``codec`` is passed to
    :func:`~prism_vfm.video.data.synthetic.write_video`; the default, MPEG-4 Part 2 in AVI (the UCF101 and
    HMDB51 files' format, at quantiser 2), decodes to within about 10 grey levels of the rendered frames
    (mostly the background noise) and writes byte-identical files for the same arguments — libx264's H.264
    does not: its output varies from run to run.
    """
    root = Path(root)
    video_root = root / "videos"
    splits = demo_splits(seed)
    colours = list(COLOURS)
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {sorted(CODECS)}")
    ext = CODECS[codec][1]
    rows: list[list[object]] = []
    samples: dict[str, list[VideoSample]] = {}
    sets = {
        "train": (splits.video_classes, train_per_class),
        "val": (splits.video_classes, val_per_class),
        "test": (splits.video_classes, test_per_class),
        "tier1": (splits.tier1, zeroshot_per_class),
        "tier2": (splits.tier2, zeroshot_per_class),
        "control": (splits.control, zeroshot_per_class),
    }
    for name, (classes, per_class) in sets.items():
        labels = {c: i for i, c in enumerate(splits.control_candidates if name == "control" else classes)}
        samples[name] = []
        for shape, motion in classes:
            for i in range(per_class):
                render_seed = clip_seed(seed, name, shape, motion, i)
                colour = colours[(i + SHAPES.index(shape)) % len(colours)]
                clip = render_clip(shape, motion, colour, render_seed)
                rel = f"{name}_{shape}_{motion.replace(' ', '_')}_{i:03d}{ext}"
                write_video(video_root / rel, clip.frames, codec)
                samples[name].append(VideoSample(rel, labels[(shape, motion)]))
                rows.append([rel, name, shape, colour, motion, render_seed])
    lists: dict[str, Path] = {}
    label_csvs: dict[str, Path] = {}
    protocols: dict[str, Path] = {}
    write_label_csv(root / "labels.csv", splits.names(splits.video_classes))
    for name in ("train", "val", "test"):
        lists[name] = root / f"{name}.txt"
        write_video_list(lists[name], samples[name])
        label_csvs[name] = root / "labels.csv"
    zs = root / "zeroshot"
    zs.mkdir(parents=True, exist_ok=True)
    for name, classes in (
        ("tier1", splits.tier1), ("tier2", splits.tier2), ("control", splits.control_candidates)
    ):  # fmt: skip
        lists[name], label_csvs[name] = zs / f"{name}.txt", zs / f"{name}_labels.csv"
        write_video_list(lists[name], samples[name])
        write_label_csv(label_csvs[name], splits.names(classes))
        protocols[name] = zs / f"{name}.yaml"
        protocol = {
            "name": f"demo_{name}",
            "videos": "../videos",
            "splits": [{"list": f"{name}.txt", "labels": f"{name}_labels.csv"}],
            "templates": ["{}"],
            "frames": NUM_FRAMES,
            "size": FRAME_SIZE,
        }
        protocols[name].write_text(yaml.safe_dump(protocol, sort_keys=False))
    clips_csv = root / "clips.csv"
    with clips_csv.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "split", "shape", "colour", "motion", "seed"])
        writer.writerows(rows)
    return DemoDataset(
        root, video_root, splits, splits.names(splits.video_classes), lists, label_csvs, protocols,
        samples, clips_csv,
    )  # fmt: skip
