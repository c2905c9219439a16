"""Video data: released frame indices and view geometry, readers, broken input, determinism, bad input."""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from prism_vfm.data.registry import get_video_dataset
from prism_vfm.video.data import sampling
from prism_vfm.video.data.dataset import DataIssues, VideoDataset
from prism_vfm.video.data.decode import PyAVVideo, VideoOpenError, open_video
from prism_vfm.video.data.lists import (
    hmdb51_split,
    kinetics_annotations,
    read_label_csv,
    read_video_list,
    ssv2_annotations,
    ucf101_split,
)
from prism_vfm.video.data.synthetic import (
    LEVEL_STEP,
    frame_level,
    synthetic_frames,
    write_tiny_video_dataset,
    write_video,
)
from prism_vfm.video.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    EvalViews,
    TrainAugment,
    crop_offsets,
    normalize,
    random_sized_crop_box,
)
from tests.conftest import REPO_ROOT

TRAIN_UTILS = Path(__file__).resolve().parent / "fixtures" / "vidprism_official" / "train_utils"


def released_index_cases() -> list[dict]:
    """The released frame indices of ``train_utils/reference.json`` (27 (N, T) cases)."""
    return json.loads((TRAIN_UTILS / "reference.json").read_text())["frame_indices"]["cases"]


def frame_numbers(video: torch.Tensor) -> list[int]:
    """Which synthetic frame each normalised frame ``(T, 3, H, W)`` shows (its grey level, below the bar)."""
    red = video[:, 0, video.shape[-2] // 2 :] * CLIP_STD[0] + CLIP_MEAN[0]
    levels = (red.mean(dim=(1, 2)) * 255).tolist()
    return [round((v - frame_level(0)) / LEVEL_STEP) for v in levels]


# --- released frame indices ---------------------------------------------------------------------------


def test_tsn_train_indices_equal_the_released_draws():
    for case in released_index_cases():
        for draw in case["train"]:
            rng = random.Random(draw["python_random_seed"])
            got = sampling.tsn_train_indices(case["N"], case["T"], rng)
            assert got == draw["decoded_frames"], (case["N"], case["T"], draw["python_random_seed"])


def test_val_and_multi_clip_test_indices_equal_the_released():
    for case in released_index_cases():
        n, t = case["N"], case["T"]
        assert sampling.val_indices(n, t) == case["val"]["decoded_frames"], (n, t)
        for clips, ref in case["test"].items():
            got = sampling.test_indices(n, t, int(clips))
            assert [i for clip in got for i in clip] == ref["decoded_frames"], (n, t, clips)
            starts = ref["clip_starts (as computed here, numpy >= 2 floors)"]
            assert sampling.test_clip_starts(n, t, int(clips)) == starts


def test_dense_indices_equal_the_released():
    for case in released_index_cases():
        n, t, dense = case["N"], case["T"], case["dense"]
        first = [o - 1 for o in dense["train_np_seed0"]]
        assert sampling.dense_train_indices(n, t, np.random.RandomState(0)) == first, (n, t)
        assert [i for c in sampling.dense_test_indices(n, t, 3) for i in c] == [
            o - 1 for o in dense["test_clips3"]
        ], (n, t)
        assert "ZeroDivisionError" in dense["test_clips1"]  # released; ours reads one clip at start 0
        assert sampling.dense_test_indices(n, t, 1) == [sampling.dense_test_indices(n, t, 3)[0]]


def test_sampling_rejects_an_empty_video():
    with pytest.raises(ValueError, match="n_frames=0"):
        sampling.val_indices(0, 8)


# --- view geometry -------------------------------------------------------------------------------------


def test_test_crop_offsets_are_the_released_positions():
    # 320x240 scaled to shorter side 224 is 298 wide: quarter step (298 - 224) // 4 = 18.
    assert crop_offsets(224, 298, 224, 1) == [(0, 37, False)]
    assert crop_offsets(224, 298, 224, 3) == [(0, 0, False), (0, 72, False), (0, 36, False)]
    five = [(0, 0), (0, 72), (0, 0), (0, 72), (0, 36)]
    assert crop_offsets(224, 298, 224, 5) == [(t, left, False) for t, left in five]
    assert crop_offsets(224, 298, 224, 10) == [(t, left, f) for t, left in five for f in (False, True)]
    assert crop_offsets(298, 224, 224, 5)[1:] == [
        (0, 0, False),
        (72, 0, False),
        (72, 0, False),
        (36, 0, False),
    ]
    with pytest.raises(ValueError, match="test crops must be one of"):
        crop_offsets(224, 224, 224, 4)


def test_test_views_are_crop_major_with_flips_and_clip_minor():
    gen = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (2, 3, 3, 240, 320), dtype=torch.uint8, generator=gen)
    views = EvalViews(224, 10)(clips)
    assert views.shape == (20, 3, 3, 224, 224)
    one = EvalViews(224, 1)(clips)
    three = EvalViews(224, 3)(clips)
    assert one.shape == (2, 3, 3, 224, 224)
    # Crop 2 of three (the centre, at left 36) vs the single centre crop (left 37): one column apart.
    assert torch.equal(three[4][..., 1:], one[0][..., :-1]) and torch.equal(
        three[5][..., 1:], one[1][..., :-1]
    )
    # Ten crops: every crop followed by its mirror; views crop-major, clips inside.
    for c in range(5):
        for k in range(2):
            assert torch.equal(views[2 * c * 2 + 2 + k], views[2 * c * 2 + k].flip(-1))
    assert torch.equal(views[0], three[0]) and torch.equal(views[1], three[1])


def test_normalisation_is_the_released_divide_by_255_then_clip_mean_and_std():
    clip = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    assert torch.allclose(normalize(clip), (clip.float() / 255.0 - mean) / std, atol=1e-6, rtol=0)


def test_random_sized_crop_box_follows_the_released_ranges():
    rng = random.Random(0)
    for _ in range(200):
        box = random_sized_crop_box(256, 341, rng)
        assert box is not None
        top, left, h, w = box
        assert 0 <= top <= 256 - h and 0 <= left <= 341 - w
        assert 0.07 <= h * w / (256 * 341) <= 1.0
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05 or 3 / 4 - 0.05 <= h / w <= 4 / 3 + 0.05
    assert random_sized_crop_box(1, 1000, random.Random(0)) is None  # no box fits: the release's fallback


def test_train_augment_applies_one_set_of_parameters_to_every_frame():
    gen = torch.Generator().manual_seed(1)
    clip = torch.randint(0, 256, (4, 3, 240, 320), dtype=torch.uint8, generator=gen)
    augment = TrainAugment(224, 256)
    for seed in range(8):
        out, label = augment(clip, 5, random.Random(seed))
        assert out.shape == (4, 3, 224, 224) and out.dtype == torch.float32 and label == 5
        for t in range(4):
            alone, _ = augment(clip[t : t + 1], 5, random.Random(seed))
            assert torch.equal(out[t], alone[0]), (seed, t)


def test_flip_swaps_the_ssv2_mirror_classes_and_grayscale_is_off():
    info = get_video_dataset("something-something-v2")
    augment = TrainAugment(32, 36, grayscale_p=0.0, flip_label_pairs=info.flip_label_pairs)
    clip = torch.zeros(2, 3, 40, 40, dtype=torch.uint8)
    clip[..., :20] = 255  # left half white: a flip moves it right
    labels = set()
    for seed in range(20):
        out, label = augment(clip, 86, random.Random(seed))
        flipped = bool(out[0, 0, :, -1].mean() > out[0, 0, :, 0].mean())
        assert label == (87 if flipped else 86)
        labels.add(label)
    assert labels == {86, 87}


# --- readers -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
    return write_tiny_video_dataset(tmp_path_factory.mktemp("ucf"), "ucf101", corrupt_video=True)


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    return write_tiny_video_dataset(tmp_path_factory.mktemp("frames"), "frames", bad_frame=True)


@pytest.mark.parametrize("layout", ["ucf101", "hmdb51", "k400", "ssv2", "frames"])
def test_each_layout_reads_back_the_frames_it_was_written_with(tmp_path, layout):
    tiny = write_tiny_video_dataset(tmp_path, layout, n_classes=2, per_class=2, num_frames=10)
    names = read_label_csv(tiny.label_csv)
    samples = read_video_list(tiny.val_list, len(names), root=tiny.video_root)
    data = VideoDataset(tiny.video_root, samples, "val", num_frames=5, size=32)
    for i, sample in enumerate(samples):
        item = data[i]
        assert item["label"] == sample.label and item["bad_videos"] == 0 and item["bad_frames"] == 0
        assert frame_numbers(item["video"]) == sampling.val_indices(10, 5) == [0, 2, 4, 6, 8]
    test = VideoDataset(tiny.video_root, samples, "test", num_frames=4, size=32, test_clips=2, test_crops=3)
    views = test[0]["video"]
    assert views.shape == (6, 4, 3, 32, 32)
    clips = sampling.test_indices(10, 4, 2)
    assert clips == [[0, 2, 5, 7], [1, 3, 6, 8]]
    assert [frame_numbers(v) for v in views] == clips * 3  # crop-major: clip 0, clip 1 of each crop


def test_published_splits_give_the_listed_samples(tmp_path):
    for layout, read in (("ucf101", ucf101_split), ("hmdb51", hmdb51_split)):
        tiny = write_tiny_video_dataset(tmp_path / layout, layout, n_classes=3, per_class=3)
        for split in (1, 2, 3):
            train, names = read(tiny.extra["split_dir"], split, "train")
            test, _ = read(tiny.extra["split_dir"], split, "test")
            assert names == tiny.class_names
            assert sorted(train, key=lambda s: s.path) == sorted(tiny.train, key=lambda s: s.path)
            assert sorted(test, key=lambda s: s.path) == sorted(tiny.val, key=lambda s: s.path)
        with pytest.raises(ValueError, match="splits \\[1, 2, 3\\], got split 4"):
            read(tiny.extra["split_dir"], 4, "train")
    k400 = write_tiny_video_dataset(tmp_path / "k400", "k400")
    assert kinetics_annotations(k400.extra["val_csv"], k400.class_names) == k400.val
    ssv2 = write_tiny_video_dataset(tmp_path / "ssv2", "ssv2", n_classes=2)
    samples, names = ssv2_annotations(ssv2.extra["train_json"], ssv2.extra["labels_json"])
    assert (samples, names) == (ssv2.train, ssv2.class_names)


def test_pyav_seeking_reads_the_same_frames_as_decoding_through(tmp_path):
    path = write_video(tmp_path / "long.avi", synthetic_frames(150, (48, 64), noise_seed=0), "mpeg4")
    wanted = [0, 3, 40, 41, 97, 149, 3]
    through = PyAVVideo(path, seek_gap=10**9).frames(wanted)
    seeking = PyAVVideo(path, seek_gap=4).frames(wanted)
    assert all(
        a is not None and b is not None and np.array_equal(a, b)
        for a, b in zip(through, seeking, strict=True)
    )
    assert PyAVVideo(path).num_frames == 150


def test_decord_reads_what_pyav_reads(ucf):
    pytest.importorskip("decord", reason="decord is an optional decoder (pip install decord)")
    path = ucf.video_root / ucf.val[0].path
    a = open_video(path, "pyav").frames([0, 5, 11])
    b = open_video(path, "decord").frames([0, 5, 11])
    for x, y in zip(a, b, strict=True):
        assert x is not None and y is not None
        assert np.abs(x.astype(int) - y.astype(int)).mean() < 2


# --- broken input: counted, reported, survived ---------------------------------------------------------


def test_a_corrupt_video_is_replaced_counted_and_reported(ucf, caplog):
    samples = read_video_list(ucf.train_list, len(ucf.class_names), root=ucf.video_root)
    corrupt = next(i for i, s in enumerate(samples) if "corrupt" in s.path)
    data = VideoDataset(ucf.video_root, samples, "train", num_frames=4, size=32, scale_size=36)
    with caplog.at_level(logging.WARNING, logger="prism_vfm.video.data.dataset"):
        item = data[corrupt]
    assert item["bad_videos"] >= 1 and item["index"] != corrupt
    assert "corrupt" not in samples[item["index"]].path
    assert str(ucf.corrupt) in caplog.text and "cannot be opened" in caplog.text
    issues = DataIssues()
    for batch in DataLoader(data, batch_size=3):
        issues.update(batch)
    assert issues.as_dict() == {"samples": len(samples), "bad_videos": item["bad_videos"], "bad_frames": 0}
    assert f"{item['bad_videos']} videos could not be opened" in str(issues)
    assert issues.scalars() == {"data/bad_videos": float(item["bad_videos"]), "data/bad_frames": 0.0}
    resumed = DataIssues()
    resumed.load(issues.as_dict())
    assert resumed.as_dict() == issues.as_dict()


def test_an_unreadable_frame_is_replaced_by_the_previous_counted_and_reported(frames, caplog):
    data = VideoDataset(frames.video_root, frames.train, "val", num_frames=12, size=32)
    bad = next(i for i, s in enumerate(frames.train) if frames.bad_frame.parent.name in s.path)
    with caplog.at_level(logging.WARNING, logger="prism_vfm.video.data.dataset"):
        item = data[bad]
    assert (item["bad_videos"], item["bad_frames"]) == (0, 1)
    assert frame_numbers(item["video"]) == [0, 1, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert "frame 2 does not decode" in caplog.text and frames.bad_frame.parent.name in caplog.text


def test_frames_missing_from_a_cut_video_file_are_replaced_counted_and_reported(tmp_path, caplog):
    tiny = write_tiny_video_dataset(
        tmp_path, "k400", n_classes=1, per_class=1, num_frames=20, truncated_video=True
    )
    data = VideoDataset(tiny.video_root, tiny.train, "val", num_frames=10, size=32)
    with caplog.at_level(logging.WARNING, logger="prism_vfm.video.data.dataset"):
        item = data[0]
    indices = sampling.val_indices(20, 10)
    bad = item["bad_frames"]
    assert 0 < bad < len(indices) and item["bad_videos"] == 0
    assert caplog.text.count("does not decode") == bad and "truncated0" in caplog.text
    for i in indices[-bad:]:  # the cut takes the end of the file: the last sampled frames
        assert f"frame {i} does not decode" in caplog.text
    video = item["video"]
    assert frame_numbers(video[:2]) == indices[:2]
    for pos in range(len(indices) - bad, len(indices)):  # each replaced by the last one that decoded
        assert torch.equal(video[pos], video[len(indices) - bad - 1])


def test_a_video_that_never_opens_stops_with_the_paths_in_the_log(tmp_path):
    (tmp_path / "a.avi").write_bytes(b"not a video")
    from prism_vfm.video.data.lists import VideoSample

    data = VideoDataset(tmp_path, [VideoSample("a.avi", 0)], "val", num_frames=4, size=32, max_retries=2)
    with pytest.raises(RuntimeError, match="sample 0 and 2 replacements cannot be read"):
        data[0]
    with pytest.raises(VideoOpenError, match="a.avi: cannot be opened"):
        open_video(tmp_path / "a.avi")


# --- determinism ---------------------------------------------------------------------------------------


def _epoch(data: VideoDataset, epoch: int, workers: int) -> list[dict]:
    data.set_epoch(epoch)
    return list(DataLoader(data, batch_size=2, num_workers=workers))


def test_clips_depend_on_seed_epoch_and_index_only_not_on_workers(ucf):
    data = VideoDataset(ucf.video_root, ucf.train, "train", num_frames=4, size=32, scale_size=36, seed=3)
    one, two = _epoch(data, 1, 0), _epoch(data, 1, 2)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["index"], b["index"])
    resumed = VideoDataset(ucf.video_root, ucf.train, "train", num_frames=4, size=32, scale_size=36, seed=3)
    resumed.set_epoch(1)
    assert torch.equal(resumed[3]["video"], one[1]["video"][1])
    other = _epoch(data, 2, 0)
    assert not all(torch.equal(a["video"], b["video"]) for a, b in zip(one, other, strict=True))


# --- bad input -----------------------------------------------------------------------------------------


def test_bad_lists_and_label_files_are_errors_naming_file_and_line(tmp_path, ucf):
    lst = tmp_path / "list.txt"
    root = ucf.video_root
    good = ucf.val[0].path
    lst.write_text(f"{good} 0\nmissing/video.avi 1\n")
    with pytest.raises(
        FileNotFoundError, match=r"list.txt, line 2: video .*missing/video.avi does not exist"
    ):
        read_video_list(lst, 3, root=root)
    lst.write_text(f"{good} 0\n{good} zero\n")
    with pytest.raises(ValueError, match=r"list.txt, line 2: label 'zero' is not an integer"):
        read_video_list(lst, 3)
    lst.write_text(f"{good} 0\n\n{good} 7\n")
    with pytest.raises(
        ValueError, match=r"list.txt, line 3: label 7 is outside the label CSV's classes \(0..2\)"
    ):
        read_video_list(lst, len(read_label_csv(ucf.label_csv)))
    lst.write_text(f"{good} 0 1\n")
    with pytest.raises(ValueError, match=r"list.txt, line 1: frame count is 0"):
        read_video_list(lst, 3)
    lst.write_text(f"{good} 5 1\n{good} 30 1\n")
    assert [s.num_frames for s in read_video_list(lst, 3, drop_short=True)] == [30]
    lst.write_text(f"{good}\n")
    with pytest.raises(
        ValueError, match=r"list.txt, line 1: expected 'path label' or 'path num_frames label'"
    ):
        read_video_list(lst, 3)
    csv = tmp_path / "labels.csv"
    csv.write_text("id,name\n0,a\n2,c\n")
    with pytest.raises(ValueError, match=r"labels.csv: class ids must be 0..1; missing \[1\]"):
        read_label_csv(csv)
    csv.write_text("name\n0,a\n")
    with pytest.raises(ValueError, match=r"labels.csv, line 1: expected the header 'id,name'"):
        read_label_csv(csv)
    with pytest.raises(ValueError, match="unknown video dataset 'k700'"):
        get_video_dataset("k700")
    assert get_video_dataset("kinetics400").num_classes == 400 and get_video_dataset("HMDB").splits == (
        1,
        2,
        3,
    )


# --- benchmark -----------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_video_data_benchmark_quick_run_prints_its_rates():
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_video_data.py"), "--quick", "--videos", "2"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for codec in ("h264", "mpeg4"):
        for stage in ("decode+augment", "decode"):
            line = rf"^rate {codec} pyav {re.escape(stage)}: [.0-9]+ clips/s"
            assert re.search(line, result.stdout, re.M), result.stdout
            if importlib.util.find_spec("decord") is not None:
                assert f"ratio {codec} {stage} decord / pyav time:" in result.stdout, result.stdout
    assert "method:" in result.stdout
