"""Stage-1 image folder: layouts, decoding odd formats to RGB, skipping broken files, the seeded loader."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from prism_vfm.data.image_folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    UnlabelledImageFolder,
    build_stage1_loader,
    load_rgb,
    stage1_train_transform,
)
from prism_vfm.data.synthetic import write_tiny_image_folder

LOGGER = "prism_vfm.data.image_folder"


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_image_folder(tmp_path / "tiny")


def _tiny_png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path, format="PNG")


def _palette(transparency: bytes | None = None) -> Image.Image:
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50])
    img.putpixel((1, 0), 1)
    if transparency is not None:
        img.info["transparency"] = transparency
    return img


# (file name, image written, expected RGB of its single row); each value pins one conversion rule.
DECODE_CASES = {
    "gray": ("g.png", Image.fromarray(np.array([[0, 77, 255]], np.uint8)), [[0] * 3, [77] * 3, [255] * 3]),
    "palette": ("p.png", _palette(), [[10, 20, 30], [200, 100, 50]]),
    "palette_transparent": ("pt.png", _palette(b"\x80\x40"), [[10, 20, 30], [200, 100, 50]]),
    "rgba_alpha_dropped": (
        "rgba.png",
        Image.fromarray(np.array([[[10, 20, 30, 0], [40, 50, 60, 255]]], np.uint8)),
        [[10, 20, 30], [40, 50, 60]],
    ),
    "la_alpha_dropped": (
        "la.png",
        Image.fromarray(np.array([[[50, 0], [200, 255]]], np.uint8), mode="LA"),
        [[50] * 3, [200] * 3],
    ),
    "uint16_scaled_not_clipped": (
        "g16.png",
        Image.fromarray(np.array([[0, 128, 129, 257, 32896, 65535]], np.uint16)),
        [[0] * 3, [0] * 3, [1] * 3, [1] * 3, [128] * 3, [255] * 3],
    ),
    "int32_read_as_16bit": (
        "i.tif",
        Image.fromarray(np.array([[-5, 257, 65535, 70000]], np.int32)),
        [[0] * 3, [1] * 3, [255] * 3, [255] * 3],
    ),
    "float_unit_scale": (
        "f1.tif",
        Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)),
        [[0] * 3, [128] * 3, [255] * 3],
    ),
    "float_8bit_scale": (
        "f255.tif",
        Image.fromarray(np.array([[np.nan, 128.0, 300.0]], np.float32)),
        [[0] * 3, [128] * 3, [255] * 3],
    ),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_odd_modes_decode_to_exact_8bit_rgb(tmp_path, case):
    name, img, expected = DECODE_CASES[case]
    img.save(tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Pillow's palette-transparency warning must not fire
        rgb = load_rgb(tmp_path / name)
    assert rgb.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(rgb), np.array([expected], np.uint8))


def test_synthetic_odd_files_decode_to_rgb(tiny):
    for path in tiny.good:
        rgb = load_rgb(path)
        assert (rgb.mode, rgb.size) == ("RGB", (48, 40)), path
    cyan = np.asarray(load_rgb(tiny.odd["cmyk"])).reshape(-1, 3)
    assert np.abs(cyan.astype(int) - [0, 255, 255]).max() <= 3
    ramp = np.asarray(load_rgb(tiny.odd["gray16"]))
    assert ramp[0, 0].tolist() == [0, 0, 0] and ramp[0, -1].tolist() == [255, 255, 255]
    assert np.all(np.diff(ramp[0, :, 0].astype(int)) >= 0)
    assert np.asarray(load_rgb(tiny.odd["rgba"])).shape == (40, 48, 3)
    for path in tiny.bad:
        with pytest.raises(OSError):
            load_rgb(path)


def test_unreadable_files_are_replaced_by_the_next_readable_one_counted_and_warned_once(tiny, caplog):
    ds = UnlabelledImageFolder(tiny.root)
    files = [ds.path(i) for i in range(len(ds))]
    bad = {i for i, p in enumerate(files) if p in tiny.bad}
    assert len(bad) == 2

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(2):  # a second pass counts again but neither re-decodes nor re-warns
            for i in range(len(ds)):
                j = i
                while j in bad:
                    j = (j + 1) % len(ds)
                np.testing.assert_array_equal(np.asarray(ds[i]), np.asarray(load_rgb(files[j])))
    assert ds.skipped == 4 and ds.skipped_per_worker[0] == 4
    warned = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warned) == 2
    for path in tiny.bad:
        (line,) = [m for m in warned if str(path) in m]
        assert "\n" not in line and ("Error" in line or "error" in line)
    ds.reset_skipped()
    assert ds.skipped == 0


def test_a_run_of_bad_files_counts_one_skip_per_requested_sample(tmp_path):
    for name in ["a.png", "d.png"]:
        _tiny_png(tmp_path / name)
    for name in ["b.png", "c.png"]:
        (tmp_path / name).write_bytes(b"garbage")
    ds = UnlabelledImageFolder(tmp_path)
    assert (
        np.asarray(ds[1]).tolist() == np.asarray(ds[2]).tolist() == np.asarray(load_rgb(ds.path(3))).tolist()
    )
    assert ds.skipped == 2


def test_a_folder_with_no_readable_file_is_an_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(RuntimeError, match="could be decoded"):
        UnlabelledImageFolder(tmp_path)[0]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_full_pass_keeps_epoch_length_and_yields_valid_batches(tiny, num_workers):
    n = len(tiny.good) + len(tiny.bad)
    loader = build_stage1_loader(
        tiny.root, img_size=(32, 24), batch_size=4, num_workers=num_workers, seed=0, drop_last=False
    )
    assert len(loader.dataset) == n
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        sizes = []
        for batch in loader:
            assert batch.dtype == torch.float32 and batch.shape[1:] == (3, 32, 24)
            assert torch.isfinite(batch).all()
            sizes.append(batch.shape[0])
        assert sizes == [4, 4, 4, 2]
        # Aggregated over the worker processes through shared memory.
        assert loader.dataset.skipped == len(tiny.bad) * (epoch + 1)

    dropping = build_stage1_loader(tiny.root, 16, batch_size=4, num_workers=num_workers, seed=0)
    assert len(dropping) == n // 4 == len(list(dropping))


def _epochs(loader, n_epochs=2):
    batches = []
    for epoch in range(n_epochs):
        loader.sampler.set_epoch(epoch)
        batches += list(loader)
    return batches


def test_same_seed_gives_identical_batches_and_another_seed_does_not(tiny):
    def make(seed):
        return build_stage1_loader(tiny.root, 16, batch_size=4, num_workers=2, seed=seed)

    first, second, other = _epochs(make(0)), _epochs(make(0)), _epochs(make(1))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert not torch.equal(first[0], first[len(first) // 2])  # set_epoch reshuffles and re-augments


def test_without_workers_batches_follow_the_global_torch_seed(tiny):
    def run():
        torch.manual_seed(123)
        return _epochs(build_stage1_loader(tiny.root, 16, batch_size=4, num_workers=0, seed=0))

    assert all(torch.equal(a, b) for a, b in zip(run(), run(), strict=True))


def test_ranks_partition_the_folder_and_reshuffle_per_epoch(tiny):
    loaders = [
        build_stage1_loader(tiny.root, 16, batch_size=2, num_workers=0, seed=0, rank=r, world_size=2)
        for r in range(2)
    ]
    orders = [list(loader.sampler) for loader in loaders]
    assert not set(orders[0]) & set(orders[1])
    assert sorted(orders[0] + orders[1]) == list(range(len(loaders[0].dataset)))
    loaders[0].sampler.set_epoch(1)
    assert list(loaders[0].sampler) != orders[0]
    with pytest.raises(ValueError, match="rank 2"):
        build_stage1_loader(tiny.root, 16, batch_size=2, num_workers=0, seed=0, rank=2, world_size=2)


def test_flat_folder_searched_one_level_deep_with_any_case_extensions(tmp_path):
    names = ["b.jpg", "a.PNG", "sub/c.WebP", "sub/deeper/too_deep.png", "notes.txt"]
    for rel in names + [".hidden.jpg", "sub/._c.jpg", ".cache/x.png"]:
        _tiny_png(tmp_path / rel)
    ds = UnlabelledImageFolder(tmp_path)
    assert [ds.path(i).relative_to(tmp_path).as_posix() for i in range(len(ds))] == [
        "a.PNG",
        "b.jpg",
        "sub/c.WebP",
    ]


def test_imagenet_class_layout_is_found_sorted_and_unlabelled(tiny):
    ds = UnlabelledImageFolder(tiny.root)
    assert [ds.path(i) for i in range(len(ds))] == sorted(tiny.good + tiny.bad)
    assert isinstance(ds[0], Image.Image)  # no label attached
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_missing_or_empty_root_is_an_error_naming_the_path_and_layouts(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*ImageNet layout"):
        UnlabelledImageFolder(missing)
    empty = tmp_path / "empty"
    (empty / "class_a").mkdir(parents=True)
    (empty / "class_a" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"empty.*ImageNet layout.*\.jpeg.*\.webp"):
        UnlabelledImageFolder(empty)


def test_train_transform_is_the_stage1_recipe_and_accepts_non_square_sizes():
    transform = stage1_train_transform((16, 24))
    crop, flip, _, normalize = transform.transforms
    assert crop.size == (16, 24) and crop.scale == (0.08, 1.0)
    assert crop.interpolation == transforms.InterpolationMode.BILINEAR
    assert isinstance(flip, transforms.RandomHorizontalFlip)
    assert (tuple(normalize.mean), tuple(normalize.std)) == (IMAGENET_MEAN, IMAGENET_STD)

    out = transform(Image.new("RGB", (30, 20), (255, 0, 128)))
    expected = (torch.tensor([255, 0, 128]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert out.shape == (3, 16, 24)
    torch.testing.assert_close(out, expected.view(3, 1, 1).expand(3, 16, 24))
    assert stage1_train_transform(8)(Image.new("RGB", (10, 10))).shape == (3, 8, 8)
