"""The VidPrism demo's clips: motions that need each mechanism, learnable appearance, splits, and a data set
the ordinary readers load."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from prism_vfm.video.data.dataset import VideoDataset
from prism_vfm.video.data.decode import open_video
from prism_vfm.video.data.lists import read_label_csv, read_video_list
from prism_vfm.video.demo.clips import (
    ALL_MOTIONS,
    BLINK_PAIR,
    BLINK_PERIODS,
    COLOURS,
    CONTROL_MOTION,
    FRAME_SIZE,
    MOTION_GROUPS,
    MOTIONS,
    NUM_FRAMES,
    REVERSAL_PAIRS,
    SHAPES,
    class_name,
    demo_splits,
    render_clip,
    write_demo_dataset,
)
from prism_vfm.video.zeroshot import read_protocol


def test_clip_geometry_and_groups():
    clip = render_clip("star", "moving left", "red", 0)
    assert clip.frames.shape == (NUM_FRAMES, FRAME_SIZE, FRAME_SIZE, 3) and clip.frames.dtype == np.uint8
    assert len(clip.states) == NUM_FRAMES
    grouped = [m for group in MOTION_GROUPS.values() for m in group]
    assert sorted(grouped) == sorted(MOTIONS) and len(MOTIONS) == 12
    assert CONTROL_MOTION not in MOTIONS


@pytest.mark.parametrize("pair", REVERSAL_PAIRS)
def test_reversal_pairs_are_the_same_frames_in_reverse_order(pair):
    first, second = pair
    for seed, shape in enumerate(("circle", "bar", "triangle")):
        forward = render_clip(shape, first, "blue", seed)
        backward = render_clip(shape, second, "blue", seed)
        np.testing.assert_array_equal(backward.frames, forward.frames[::-1])
        assert [s.x for s in backward.states] == [s.x for s in reversed(forward.states)]
        assert all(s.motion == second for s in backward.states)
        # Not a palindrome: the order of the frames is what tells the pair apart.
        assert np.abs(forward.frames[0].astype(int) - forward.frames[-1]).max() > 50


def test_motions_show_in_the_frames_as_their_names_say():
    def track(motion: str) -> list:
        return render_clip("square", motion, "yellow", 3).states

    right, down, grow, appear = (track(m) for m in ("moving right", "moving down", "growing", "appearing"))
    assert right[-1].x - right[0].x >= 10 and right[0].y == right[-1].y
    assert down[-1].y - down[0].y >= 10 and down[0].x == down[-1].x
    assert grow[-1].radius > 2 * grow[0].radius
    assert appear[0].alpha == 0.0 and appear[-1].alpha == 1.0
    spin = track("spinning")
    assert len({round(s.angle) for s in spin}) == NUM_FRAMES
    still = render_clip("square", "still", "yellow", 3).frames.astype(int)
    moving = render_clip("square", "moving right", "yellow", 3).frames.astype(int)
    # A still clip changes only by noise; a moving square changes many pixels by a lot.
    assert (np.abs(still[-1] - still[0]) > 40).sum() == 0
    assert (np.abs(moving[-1] - moving[0]) > 40).sum() > 50


def test_blink_pair_has_the_same_on_fraction_and_different_periods():
    periods = {}
    for motion in BLINK_PAIR:
        for seed in range(4):
            alpha = np.array([s.alpha for s in render_clip("cross", motion, "green", seed).states])
            assert set(alpha.tolist()) == {0.0, 1.0}
            assert alpha.mean() == 0.5
            period = BLINK_PERIODS[motion]
            np.testing.assert_array_equal(alpha[period:], alpha[:-period])  # periodic with its period
            assert not np.array_equal(alpha[period // 2 :], alpha[: -(period // 2)])
            periods[motion] = period
            # The frames show it: the shape's pixels are there exactly when it is on.
            frames = render_clip("cross", motion, "green", seed).frames.astype(float)
            green = frames[..., 1] - frames[..., [0, 2]].mean(-1)
            np.testing.assert_array_equal((green > 80).any(axis=(1, 2)), alpha == 1.0)
    assert periods[BLINK_PAIR[0]] != periods[BLINK_PAIR[1]]


def test_rendering_is_deterministic_and_seeded():
    a = render_clip("ring", "spinning", "red", 11)
    b = render_clip("ring", "spinning", "red", 11)
    assert a.frames.tobytes() == b.frames.tobytes() and a.states == b.states
    assert render_clip("ring", "spinning", "red", 12).frames.tobytes() != a.frames.tobytes()


def test_captions_describe_the_frame():
    clip = render_clip("star", "moving left", "red", 5)
    state = clip.states[-1]
    caption = state.caption()
    assert caption.startswith("a bright ") and "red star moving left in the" in caption
    assert state.position in caption and state.size in caption
    assert state.caption(keep=("colour",)) == "a red star"
    appearing = render_clip("star", "appearing", "red", 5).states
    assert appearing[0].caption() == "an empty scene"
    assert any(s.brightness == "faint" for s in appearing)
    assert render_clip("bar", "spinning", "red", 5).states[0].state in ("upright", "tilted")
    assert class_name("star", "moving left") == "a star moving left"


def _random_conv_features(frames: np.ndarray) -> np.ndarray:
    """Translation-invariant features of raw frames: fixed random 5×5 filters, ReLU, global max and mean."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 3, 5, 5, generator=g)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    x = x - x.mean((2, 3), keepdim=True)
    y = torch.nn.functional.conv2d(x, weight, padding=2).relu()
    return torch.cat([y.amax((2, 3)), y.mean((2, 3)), torch.ones(len(y), 1)], 1).numpy()


def test_appearance_classes_are_separable_from_a_single_frame():
    """A linear read-out of fixed random features of one raw frame tells shape × colour apart."""
    rng = np.random.default_rng(0)
    colours = list(COLOURS)

    def frames(n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for i in range(n):
            shape, colour = i % len(SHAPES), (i // len(SHAPES)) % len(colours)
            clip = render_clip(SHAPES[shape], MOTIONS[rng.integers(12)], colours[colour], offset + i)
            visible = [k for k, s in enumerate(clip.states) if s.alpha > 0.9]
            for k in rng.choice(visible, 3):
                xs.append(clip.frames[k])
                ys.append(shape * len(colours) + colour)
        return np.stack(xs), np.array(ys)

    x_train, y_train = frames(384, 0)
    x_test, y_test = frames(96, 10**6)
    f_train, f_test = _random_conv_features(x_train), _random_conv_features(x_test)
    onehot = np.eye(len(SHAPES) * len(colours))[y_train]
    w = np.linalg.solve(f_train.T @ f_train + np.eye(f_train.shape[1]), f_train.T @ onehot)
    pred = (f_test @ w).argmax(1)
    assert (pred % 4 == y_test % 4).mean() > 0.95  # colour
    assert (pred // 4 == y_test // 4).mean() > 0.6  # shape (chance 1/8)
    assert (pred == y_test).mean() > 0.6  # shape × colour (chance 1/32)


def test_splits_hold_out_what_they_say():
    splits = demo_splits(0)
    assert len(splits.video_classes) == 48 and len(set(splits.video_classes)) == 48
    assert len(splits.video_shapes) == 5 and len(splits.novel_shapes) == 3
    assert set(splits.video_shapes) | set(splits.novel_shapes) == set(SHAPES)
    trained_shapes = {s for s, _ in splits.video_classes}
    trained_motions = {m for _, m in splits.video_classes}
    assert trained_shapes == set(splits.video_shapes) and trained_motions == set(MOTIONS)
    # Tier 1: each motion once, with a shape and a motion both trained, never together.
    assert sorted(m for _, m in splits.tier1) == sorted(MOTIONS)
    assert not set(splits.tier1) & set(splits.video_classes)
    assert all(s in trained_shapes for s, _ in splits.tier1)
    # Tier 2: shapes no training video shows, with every motion.
    assert {s for s, _ in splits.tier2} == set(splits.novel_shapes) and len(splits.tier2) == 36
    assert CONTROL_MOTION not in trained_motions
    assert set(splits.control) <= set(splits.control_candidates)
    assert {m for _, m in splits.control_candidates} == set(ALL_MOTIONS)
    assert splits.names(splits.tier1[:1]) == [class_name(*splits.tier1[0])]
    assert demo_splits(0) == splits and demo_splits(1) != splits


def _digests(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_written_dataset_is_byte_identical_for_a_seed(tmp_path):
    kwargs = dict(train_per_class=1, val_per_class=0, test_per_class=0, zeroshot_per_class=0, seed=3)
    write_demo_dataset(tmp_path / "a", **kwargs)
    write_demo_dataset(tmp_path / "b", **kwargs)
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert len(a) > 48 and a == b


def test_written_dataset_loads_through_the_readers_with_its_labels(tmp_path):
    data = write_demo_dataset(tmp_path, train_per_class=1, val_per_class=1, test_per_class=0,
                              zeroshot_per_class=1, seed=0)  # fmt: skip
    names = read_label_csv(data.root / "labels.csv")
    assert names == data.splits.names(data.splits.video_classes)
    train = read_video_list(data.lists["train"], len(names), root=data.video_root)
    assert [s.label for s in train] == list(range(48))
    val = VideoDataset(data.video_root, read_video_list(data.lists["val"]), mode="val",
                       num_frames=NUM_FRAMES, size=FRAME_SIZE, scale_size=FRAME_SIZE)  # fmt: skip
    item = val[5]
    assert item["video"].shape == (NUM_FRAMES, 3, FRAME_SIZE, FRAME_SIZE) and item["label"] == 5
    # The decoded frames are the rendered ones up to the codec's loss, in order.
    shape, motion = data.splits.video_classes[5]
    rows = [r.split(",") for r in data.clips_csv.read_text().splitlines()[1:]]
    row = next(r for r in rows if r[0] == val.samples[5].path)
    assert (row[2], row[4]) == (shape, motion)
    rendered = render_clip(shape, motion, row[3], int(row[5])).frames.astype(int)
    video = open_video(data.video_root / row[0])
    decoded = np.stack(video.frames(list(range(NUM_FRAMES)))).astype(int)
    video.close()
    assert np.abs(decoded - rendered).mean() < 12
    # Each decoded frame is nearest to a rendered frame a few frames from its own (the shape moves
    # 0.3–0.5 pixels a frame and the codec catches up with sub-pixel motion in steps): the motion is kept,
    # in order.
    nearest = np.abs(decoded[:, None] - rendered[None]).mean(axis=(2, 3, 4)).argmin(1)
    assert np.abs(nearest - np.arange(NUM_FRAMES)).max() <= 4
    assert np.corrcoef(nearest, np.arange(NUM_FRAMES))[0, 1] > 0.95
    for name, classes in (("tier1", data.splits.tier1), ("tier2", data.splits.tier2)):
        labels = read_label_csv(data.label_csvs[name])
        assert labels == data.splits.names(classes)
        protocol = read_protocol(data.protocols[name])
        samples = read_video_list(protocol.splits[0].list, len(labels), root=protocol.videos)
        assert [labels[s.label] for s in samples] == labels
    control = read_label_csv(data.label_csvs["control"])
    samples = read_video_list(data.lists["control"], len(control))
    assert {control[s.label] for s in samples} == set(data.splits.names(data.splits.control))
