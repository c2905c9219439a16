"""Stage-2 data: the PASCAL-Context and NYUD-v2 release readers, their label rules, the SPEC §8 train and
test transforms, and the tiny release-layout generators they are tested on."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torch.utils.data import DataLoader

from prism_vfm.data.dense_transforms import (
    DenseTestTransform,
    DenseTrainTransform,
    build_dense_transform,
    crop,
    horizontal_flip,
    ignore_regions,
    normalize,
    photometric_distortion,
    random_crop,
    rescale,
    scale_saturation,
    shift_hue,
)
from prism_vfm.data.image_folder import IMAGENET_MEAN, IMAGENET_STD
from prism_vfm.data.labels import IGNORE_INDEX, check_label_values
from prism_vfm.data.nyud import NYUDv2
from prism_vfm.data.pascal_context import HUMAN_PART_CLASSES, PascalContext, edge_from_label_map
from prism_vfm.data.registry import dataset_tasks, get_dataset
from prism_vfm.data.tiny_dense import CONTEXT_CLASSES, write_tiny_nyud, write_tiny_pascal

SIZE = (48, 64)
PERSON_ID, CAT_ID = "2008_000000", "2008_000002"  # image i shows a cat when i % 3 == 2


@pytest.fixture(scope="module")
def pascal(tmp_path_factory):
    return write_tiny_pascal(tmp_path_factory.mktemp("pascal") / "PASCALContext", size=SIZE)


@pytest.fixture(scope="module")
def nyud(tmp_path_factory):
    return write_tiny_nyud(tmp_path_factory.mktemp("nyud") / "NYUDv2", size=SIZE)


@pytest.fixture
def pascal_copy(pascal, tmp_path):
    """A private copy of the tiny PASCAL-Context release, for tests that damage files."""
    return shutil.copytree(pascal.root, tmp_path / "PASCALContext")


@pytest.fixture
def nyud_copy(nyud, tmp_path):
    return shutil.copytree(nyud.root, tmp_path / "NYUDv2")


def _png(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def _save_png(path, array) -> None:
    Image.fromarray(array).save(path, format="PNG")


def _assert_label_ranges(dataset: str, sample: dict) -> None:
    channels = dataset_tasks(dataset)
    for task in channels:
        label = sample[task]
        assert label.dtype == torch.float32 and label.ndim == 3, task
        assert label.shape[0] == (3 if task == "normals" else 1), task
        assert label.shape[1:] == sample["image"].shape[1:], task
        check_label_values(task, label, channels[task])
    for task in ("edge", "sal"):
        if task in sample:
            assert set(sample[task].unique().tolist()) <= {0.0, 1.0, IGNORE_INDEX}, task


# --- the generated releases load through the readers ----------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val"])
def test_tiny_pascal_loads_every_task_with_the_documented_shapes_and_ranges(pascal, split):
    dataset = PascalContext(pascal.root, split)
    assert dataset.ids == pascal.splits[split] and len(dataset) == len(pascal.splits[split])
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["meta"] == {"id": dataset.ids[i], "size": SIZE}
        image = sample["image"]
        assert image.shape == (3, *SIZE) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 255
        _assert_label_ranges("pascalcontext", sample)
        assert sample["edge"].sum() > 0 and sample["sal"].sum() > 0
        has_parts = bool((sample["human_parts"] > 0).any())
        assert has_parts == (dataset.ids[i] in pascal.person_ids)


@pytest.mark.parametrize("split", ["train", "val"])
def test_tiny_nyud_loads_every_task_with_the_documented_shapes_and_ranges(nyud, split):
    dataset = NYUDv2(nyud.root, split)
    assert dataset.ids == nyud.splits[split]
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["meta"] == {"id": dataset.ids[i], "size": SIZE}
        assert sample["image"].shape == (3, *SIZE)
        _assert_label_ranges("nyud", sample)
        assert dataset.boundary_gt(dataset.ids[i]).shape == SIZE


def test_a_task_subset_loads_only_those_tasks(pascal):
    sample = PascalContext(pascal.root, "val", tasks=("sal", "semseg"))[0]
    assert set(sample) == {"image", "sal", "semseg", "meta"}
    with pytest.raises(ValueError, match="depth"):
        PascalContext(pascal.root, "val", tasks=("depth",))


def test_tiny_releases_are_a_function_of_the_seed(tmp_path):
    def first_sample(seed, name):
        root = write_tiny_pascal(tmp_path / name / "PASCALContext", n_train=2, n_val=1, seed=seed).root
        return PascalContext(root, "train")[1]

    a, b, c = first_sample(3, "a"), first_sample(3, "b"), first_sample(4, "c")
    assert all(torch.equal(a[k], b[k]) for k in a if k != "meta")
    assert not torch.equal(a["image"], c["image"])


# --- PASCAL-Context label rules ------------------------------------------------------------------------


def test_normals_are_kept_only_on_classes_named_in_both_lists_and_on_tvmonitor(pascal):
    dataset = PascalContext(pascal.root, "train", tasks=("normals",))
    for sample_id in (PERSON_ID, CAT_ID):
        normals = dataset[dataset.index_of(sample_id)]["normals"].permute(1, 2, 0).numpy()
        stored = 2.0 * _png(pascal.root / "normals_distill" / f"{sample_id}.png") / 255.0 - 1.0
        label_map = dataset.label_map(sample_id)
        for name, value in CONTEXT_CLASSES.items():
            region = label_map == value
            if not region.any():
                continue
            if name in ("sky", "cat", "unknown"):  # not an NYU class, or the excluded "unknown"
                assert (normals[region] == 0).all(), name
            else:
                np.testing.assert_allclose(normals[region], stored[region], atol=1e-6, err_msg=name)


def _write_parts_mat(path, objects) -> None:
    """A PASCAL-Part ``anno`` with ``objects`` = [(class_ind, [(part_name, mask), ...]), ...]."""
    part_dtype = [("part_name", "O"), ("mask", "O")]
    object_dtype = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    rows = np.zeros((1, len(objects)), dtype=object_dtype)
    for i, (class_ind, parts) in enumerate(objects):
        part_rows = np.zeros((1, len(parts)), dtype=part_dtype)
        for j, (name, mask) in enumerate(parts):
            part_rows[0, j] = (name, mask.astype(np.uint8))
        union = np.logical_or.reduce([m for _, m in parts]) if parts else np.zeros(SIZE, bool)
        rows[0, i] = ("x", float(class_ind), union.astype(np.uint8), part_rows)
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = ("x", rows)
    scipy.io.savemat(path, {"anno": anno})


def _block(top, bottom, left, right) -> np.ndarray:
    mask = np.zeros(SIZE, dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def test_human_parts_paint_person_parts_by_the_part_table_in_annotation_order(pascal_copy):
    head, neck = _block(0, 10, 0, 10), _block(5, 15, 5, 15)  # overlapping: the later part wins
    objects = [
        (8, [("head", _block(20, 30, 0, 10))]),  # a cat's head is no human part
        (
            15,
            [
                ("head", head),
                ("neck", neck),
                ("rhand", _block(0, 5, 40, 45)),
                ("lfoot", _block(40, 48, 0, 5)),
            ],
        ),
        (15, [("ruleg", _block(30, 40, 50, 60)), ("hair", _block(32, 34, 52, 54))]),
    ]
    _write_parts_mat(pascal_copy / "human_parts" / f"{PERSON_ID}.mat", objects)
    parts = PascalContext(pascal_copy, "train", tasks=("human_parts",))[0]["human_parts"][0].numpy()
    expected = np.zeros(SIZE)
    expected[head] = HUMAN_PART_CLASSES["head"]
    expected[neck] = HUMAN_PART_CLASSES["neck"]
    expected[0:5, 40:45] = 4
    expected[40:48, 0:5] = 6
    expected[30:40, 50:60] = 5
    expected[32:34, 52:54] = 1
    np.testing.assert_array_equal(parts, expected)
    assert parts[7, 7] == 2 and parts[2, 2] == 1


def test_human_parts_read_a_single_object_with_a_single_part(pascal_copy):
    # MATLAB struct arrays of one element load as a bare struct, not a list.
    _write_parts_mat(
        pascal_copy / "human_parts" / f"{PERSON_ID}.mat", [(15, [("llarm", _block(1, 3, 1, 3))])]
    )
    parts = PascalContext(pascal_copy, "train", tasks=("human_parts",))[0]["human_parts"][0].numpy()
    assert parts.sum() == 4 * 4 and set(np.unique(parts)) == {0, 4}


def test_an_image_without_person_parts_is_entirely_ignored_after_the_transforms(pascal):
    dataset = PascalContext(pascal.root, "train", tasks=("human_parts", "semseg"))
    raw = dataset[dataset.index_of(CAT_ID)]["human_parts"]
    assert (raw == 0).all()  # the reader leaves the map as the release defines it
    for transform in (DenseTestTransform(SIZE), DenseTrainTransform((32, 48))):
        dataset.transform = transform
        assert (dataset[dataset.index_of(CAT_ID)]["human_parts"] == IGNORE_INDEX).all()
        assert not (dataset[dataset.index_of(PERSON_ID)]["human_parts"] == IGNORE_INDEX).all()


def test_a_training_crop_that_misses_every_part_is_entirely_ignored():
    parts = torch.zeros(1, 20, 20)
    parts[0, :4, :4] = 3
    sample = {"image": torch.zeros(3, 20, 20), "human_parts": parts}
    assert (ignore_regions(crop(sample, 10, 10, 8, 8))["human_parts"] == IGNORE_INDEX).all()
    kept = ignore_regions(crop(sample, 0, 0, 8, 8))["human_parts"]
    assert kept[0, 0, 0] == 3 and kept[0, 7, 7] == 0


def test_semseg_prefers_voc12_and_falls_back_to_pascal_context(pascal_copy, pascal):
    voc12_id = sorted(pascal.voc12_ids & set(pascal.splits["train"]))[0]
    context_only_id = sorted(set(pascal.splits["train"]) - pascal.voc12_ids)[0]
    dataset = PascalContext(pascal_copy, "train", tasks=("semseg",))

    def semseg(sample_id):
        return dataset[dataset.index_of(sample_id)]["semseg"][0].numpy()

    np.testing.assert_array_equal(
        semseg(voc12_id), _png(pascal_copy / "semseg" / "VOC12" / f"{voc12_id}.png")
    )
    assert (semseg(voc12_id) == IGNORE_INDEX).any()  # the VOC12 void band
    np.testing.assert_array_equal(
        semseg(context_only_id), _png(pascal_copy / "semseg" / "pascal-context" / f"{context_only_id}.png")
    )
    (pascal_copy / "semseg" / "VOC12" / f"{voc12_id}.png").unlink()
    np.testing.assert_array_equal(
        semseg(voc12_id), _png(pascal_copy / "semseg" / "pascal-context" / f"{voc12_id}.png")
    )


def test_edge_label_is_the_thinned_nonzero_laplacian_of_the_label_map(pascal):
    assert not edge_from_label_map(np.full((6, 8), 7)).any()

    halves = np.ones((8, 10), dtype=np.int64)
    halves[:, 5:] = 2
    edge = edge_from_label_map(halves)
    # Both sides of the border respond (a 2-pixel band); thinning leaves one line, possibly a pixel short.
    assert (edge.sum(axis=1) <= 1).all() and edge[:, 4:6].sum() >= 7
    assert not edge[:, :4].any() and not edge[:, 6:].any()

    # Equally spaced classes 1 | 2 | 3: the Laplacian vanishes on the middle class, so it carries no edge
    # although both its neighbours differ from it.
    ramp = np.tile(np.array([1, 1, 2, 3, 3]), (6, 1))
    expected = np.zeros(ramp.shape, dtype=bool)
    expected[:, [1, 3]] = True
    np.testing.assert_array_equal(edge_from_label_map(ramp), expected)

    dataset = PascalContext(pascal.root, "train", tasks=("edge",))
    np.testing.assert_array_equal(
        dataset[0]["edge"][0].numpy(), edge_from_label_map(dataset.label_map(PERSON_ID))
    )


def test_the_evaluation_edge_label_is_one_pixel_over_from_the_released_one(pascal):
    halves = np.ones((8, 10), dtype=np.int64)
    halves[:, 5:] = 2
    evaluation = edge_from_label_map(halves, "evaluation")
    # The pixel whose east neighbour differs (the evaluation's seg2bmap), on every row.
    expected = np.zeros(halves.shape, dtype=bool)
    expected[:, 4] = True
    np.testing.assert_array_equal(evaluation, expected)
    assert not np.array_equal(evaluation, edge_from_label_map(halves))  # the released label: another pixel
    with pytest.raises(ValueError, match="unknown edge label 'sobel'"):
        edge_from_label_map(halves, "sobel")

    dataset = PascalContext(pascal.root, "train", tasks=("edge",), edge_label="evaluation")
    label_map = dataset.label_map(PERSON_ID)
    np.testing.assert_array_equal(dataset[0]["edge"][0].numpy(), edge_from_label_map(label_map, "evaluation"))
    assert not np.array_equal(dataset[0]["edge"][0].numpy(), edge_from_label_map(label_map))
    with pytest.raises(ValueError, match="unknown edge_label"):
        PascalContext(pascal.root, "train", tasks=("edge",), edge_label="sobel")


def test_saliency_is_binarised_above_half(pascal):
    stored = _png(pascal.root / "sal_distill" / f"{PERSON_ID}.png")
    assert {0, 100, 200, 255} <= set(np.unique(stored))
    sal = PascalContext(pascal.root, "train", tasks=("sal",))[0]["sal"][0].numpy()
    np.testing.assert_array_equal(sal, (stored > 127.5).astype(np.float32))


# --- NYUD-v2 label rules ---------------------------------------------------------------------------------


def test_nyud_value_conversions(nyud):
    dataset = NYUDv2(nyud.root, "train")
    sample_id = dataset.ids[0]
    sample = dataset[0]
    stored_seg = _png(nyud.root / "segmentation" / f"{sample_id}.png").astype(np.int64)
    assert 0 in stored_seg and 40 in stored_seg
    np.testing.assert_array_equal(sample["semseg"][0].numpy(), np.where(stored_seg == 0, 255, stored_seg - 1))
    stored_normals = _png(nyud.root / "normals" / f"{sample_id}.png").astype(np.float64)
    np.testing.assert_allclose(
        sample["normals"].permute(1, 2, 0).numpy(), 2 * stored_normals / 255 - 1, atol=1e-6
    )
    stored_edge = _png(nyud.root / "edge" / f"{sample_id}.png")
    np.testing.assert_allclose(sample["edge"][0].numpy(), stored_edge / 255, atol=1e-7)
    depth = np.load(nyud.root / "depth" / f"{sample_id}.npy")
    assert (depth == 0).any()
    np.testing.assert_array_equal(sample["depth"][0].numpy(), depth)
    np.testing.assert_array_equal(dataset.boundary_gt(sample_id), stored_edge > 0)

    dataset.transform = DenseTestTransform(SIZE)
    padded = dataset[0]["depth"][0].numpy()
    np.testing.assert_array_equal(padded, np.where(depth == 0, IGNORE_INDEX, depth))


# --- errors name the file ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relative", "layout", "tasks"),
    [
        ("JPEGImages/{id}.jpg", "JPEGImages/<id>.jpg", None),
        ("normals_distill/{id}.png", "normals_distill/<id>.png", None),
        ("sal_distill/{id}.png", "sal_distill/<id>.png", ("sal",)),
        ("pascal-context/trainval/{id}.mat", "LabelMap", ("edge",)),
        ("human_parts/{id}.mat", "human_parts/<id>.mat", ("human_parts",)),
        ("semseg/pascal-context/2008_000001.png", "semseg/pascal-context/<id>.png", ("semseg",)),
    ],
)
def test_a_missing_sample_file_is_an_error_naming_it_and_the_layout(pascal_copy, relative, layout, tasks):
    sample_id = "2008_000001"  # a person, no VOC12 label
    path = pascal_copy / relative.format(id=sample_id)
    path.unlink()
    dataset = PascalContext(pascal_copy, "train", tasks=tasks)
    with pytest.raises(FileNotFoundError) as err:
        dataset[dataset.index_of(sample_id)]
    assert str(path) in str(err.value) and layout in str(err.value)


@pytest.mark.parametrize(
    ("relative", "tasks"),
    [
        ("ImageSets/Context/val.txt", ("semseg",)),
        ("ImageSets/Parts/val.txt", ("human_parts",)),
        ("json/pascal_part.json", ("human_parts",)),
        ("json/nyu_classes.json", ("normals",)),
        ("json/context_classes.json", ("normals",)),
    ],
)
def test_a_missing_release_file_is_an_error_when_the_dataset_is_built(pascal_copy, relative, tasks):
    (pascal_copy / relative).unlink()
    with pytest.raises(FileNotFoundError, match=relative.split("/")[-1]):
        PascalContext(pascal_copy, "val", tasks=tasks)


@pytest.mark.parametrize(
    "relative", ["gt_sets/train.txt", "depth/0001.npy", "segmentation/0001.png", "images/0001.png"]
)
def test_a_missing_nyud_file_is_an_error_naming_it(nyud_copy, relative):
    (nyud_copy / relative).unlink()
    with pytest.raises(FileNotFoundError, match=relative.split("/")[0]):
        NYUDv2(nyud_copy, "train")[1]


def test_a_missing_boundary_file_is_an_error_naming_it(nyud_copy):
    (nyud_copy / "edge_mat" / "0002.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"edge_mat/<id>\.mat"):
        NYUDv2(nyud_copy, "train").boundary_gt("0002")


def test_an_out_of_range_pascal_class_is_an_error_naming_the_file_and_the_value(pascal_copy):
    path = pascal_copy / "semseg" / "pascal-context" / "2008_000001.png"
    semseg = _png(path).copy()
    semseg[3, 4] = 30
    _save_png(path, semseg)
    dataset = PascalContext(pascal_copy, "train", tasks=("semseg",))
    with pytest.raises(ValueError, match="label value 30") as err:
        dataset[1]
    assert str(path) in str(err.value)


@pytest.mark.parametrize("task", ["semseg", "depth"])
def test_an_out_of_range_nyud_label_is_an_error_naming_the_file_and_the_value(nyud_copy, task):
    if task == "semseg":
        path = nyud_copy / "segmentation" / "0000.png"
        stored = _png(path).copy()
        stored[0, 0] = 41
        _save_png(path, stored)
        bad = "41"
    else:
        path = nyud_copy / "depth" / "0000.npy"
        depth = np.load(path)
        depth[0, 0] = -1.5
        np.save(path, depth)
        bad = "-1.5"
    with pytest.raises(ValueError, match=f"label value {bad}") as err:
        NYUDv2(nyud_copy, "train", tasks=(task,))[0]
    assert str(path) in str(err.value)


def test_malformed_files_are_errors_naming_them(pascal_copy):
    label_map_path = pascal_copy / "pascal-context" / "trainval" / f"{PERSON_ID}.mat"
    scipy.io.savemat(label_map_path, {"labels": np.zeros(SIZE, np.uint16)})
    with pytest.raises(ValueError, match="no variable 'LabelMap'") as err:
        PascalContext(pascal_copy, "train", tasks=("edge",))[0]
    assert str(label_map_path) in str(err.value)

    normals_path = pascal_copy / "normals_distill" / "2008_000001.png"
    _save_png(normals_path, np.zeros(SIZE, np.uint8))
    with pytest.raises(ValueError, match="not a 3-channel image"):
        PascalContext(pascal_copy, "train", tasks=("normals",))[1]

    image_path = pascal_copy / "JPEGImages" / "2008_000003.jpg"
    image_path.write_bytes(image_path.read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot be decoded") as err:
        PascalContext(pascal_copy, "train", tasks=("sal",))[3]
    assert str(image_path) in str(err.value)

    sal_path = pascal_copy / "sal_distill" / "2008_000001.png"
    _save_png(sal_path, np.zeros((SIZE[0] - 1, SIZE[1]), np.uint8))
    with pytest.raises(ValueError, match="differs from the image size"):
        PascalContext(pascal_copy, "train", tasks=("sal",))[1]


def test_a_person_part_missing_from_the_part_table_is_an_error(pascal_copy):
    _write_parts_mat(pascal_copy / "human_parts" / f"{PERSON_ID}.mat", [(15, [("tail", _block(1, 3, 1, 3))])])
    with pytest.raises(ValueError, match="'tail'"):
        PascalContext(pascal_copy, "train", tasks=("human_parts",))[0]


# --- transforms ------------------------------------------------------------------------------------------


def _class_coded_sample(height=60, width=80) -> dict:
    """Three classes in vertical and horizontal bands; the image is bright in the channel of its class,
    every other label is a function of the class too."""
    semseg = torch.zeros(1, height, width)
    semseg[:, :, width // 3 :] = 1
    semseg[:, height // 2 :, width // 2 :] = 2
    semseg[:, :4, :4] = IGNORE_INDEX
    classes = semseg.clamp(max=2).long()[0]
    image = torch.full((3, height, width), 20.0)
    image.scatter_(0, classes[None], 220.0)
    normals = torch.zeros(3, height, width)
    normals[0] = torch.where(classes == 1, 0.6, 0.0)
    normals[2] = 0.8
    return {
        "image": image,
        "semseg": semseg,
        "human_parts": semseg.clone(),
        "sal": (classes == 1).float()[None],
        "edge": (classes == 2).float()[None],
        "normals": normals,
        "depth": (classes + 1).float()[None],
        "meta": {"id": "x", "size": (height, width)},
    }


def test_train_transform_keeps_image_and_labels_aligned():
    sample = _class_coded_sample()
    transform = DenseTrainTransform((40, 56), photometric=False)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    flips = 0
    for seed in range(12):
        out = transform(sample, torch.Generator().manual_seed(seed))
        semseg = out["semseg"][0]
        valid = semseg != IGNORE_INDEX
        # Bilinear resizing mixes colours across a class border; judge pixels whose 3x3 block is one class.
        padded = torch.nn.functional.pad(semseg[None, None], (1, 1, 1, 1), value=-1)[0, 0]
        interior = torch.stack(
            [padded[1 + dy : 1 + dy + semseg.shape[0], 1 + dx : 1 + dx + semseg.shape[1]] == semseg
             for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        ).all(0) & valid  # fmt: skip
        assert interior.sum() > 100
        image = (out["image"] * std + mean) * 255
        assert torch.equal(image.argmax(0)[interior], semseg[interior].long())
        assert torch.equal(out["human_parts"][0][valid], semseg[valid])
        assert torch.equal(out["sal"][0][valid], (semseg[valid] == 1).float())
        assert torch.equal(out["edge"][0][valid], (semseg[valid] == 2).float())
        normals_x = out["normals"][0][valid & (semseg == 1)]
        assert normals_x.abs().eq(0.6).all() and len(normals_x.unique()) == 1
        flips += int(normals_x[0] < 0)
        inverse_scale = out["depth"][0][valid] / (semseg[valid] + 1)
        assert torch.allclose(inverse_scale, inverse_scale[0]) and 0.5 < inverse_scale[0] <= 2.0
    assert 0 < flips < 12


def test_rescale_resizes_labels_by_nearest_neighbour_and_divides_depth_by_the_scale():
    sample = _class_coded_sample(20, 30)
    for scale in (2.0, 0.5, 1.3):
        out = rescale(sample, scale)
        size = (int(20 * scale + 0.5), int(30 * scale + 0.5))
        assert out["image"].shape[1:] == size and out["semseg"].shape[1:] == size
        assert set(out["semseg"].unique().tolist()) <= {0.0, 1.0, 2.0, IGNORE_INDEX}
        assert torch.allclose(out["depth"] * scale, out["semseg"].clamp(max=2) + 1)
        assert torch.equal(out["image"], out["image"].round())
    assert len(rescale(sample, 2.0)["image"][0].unique()) > 2  # bilinear blends at class borders


def test_horizontal_flip_mirrors_everything_and_negates_normals_x():
    sample = _class_coded_sample(10, 12)
    sample["normals"] = torch.randn(3, 10, 12)
    before = sample["normals"].clone()
    out = horizontal_flip(sample)
    assert torch.equal(out["normals"][0], -sample["normals"][0].flip(-1))
    assert torch.equal(out["normals"][1:], sample["normals"][1:].flip(-1))
    for key in ("image", "semseg", "depth", "edge"):
        assert torch.equal(out[key], sample[key].flip(-1)), key
    assert torch.equal(sample["normals"], before)  # the input is left untouched


def test_random_crop_redraws_until_the_semseg_crop_is_balanced():
    semseg = torch.zeros(1, 40, 40)
    semseg[:, :20, :20] = 1
    sample = {"image": torch.zeros(3, 40, 40), "semseg": semseg}

    def balanced_share(redraws):
        hits = 0
        for seed in range(40):
            window = random_crop(sample, (20, 20), torch.Generator().manual_seed(seed), redraws=redraws)[
                "semseg"
            ]
            share = window.mean().item()
            hits += 0.25 < share < 0.75
        return hits / 40

    # One draw is balanced with probability 0.35; eleven draws almost surely include one.
    assert balanced_share(0) < 0.6 and balanced_share(10) >= 0.9
    small = random_crop(sample, (64, 64))
    assert small["image"].shape[1:] == (40, 40)  # nothing to crop: the padding fills the rest


def test_photometric_distortion_stays_on_the_8bit_grid_and_keeps_grey_grey():
    colourful = torch.randint(0, 256, (3, 16, 16)).float()
    grey = torch.full((3, 16, 16), 128.0)
    for seed in range(8):
        out = photometric_distortion(colourful, torch.Generator().manual_seed(seed))
        assert torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 255
        grey_out = photometric_distortion(grey, torch.Generator().manual_seed(seed))
        assert torch.equal(grey_out[0], grey_out[1]) and torch.equal(grey_out[1], grey_out[2])
    changed = [
        not torch.equal(photometric_distortion(colourful, torch.Generator().manual_seed(s)), colourful)
        for s in range(8)
    ]
    assert any(changed)


def test_hue_and_saturation_act_on_the_opencv_hsv_scales():
    def colour(r, g, b):
        return torch.tensor([r, g, b], dtype=torch.float32)[:, None, None].expand(3, 2, 2)

    red, green, blue = colour(255, 0, 0), colour(0, 255, 0), colour(0, 0, 255)
    assert torch.equal(shift_hue(red, 60), green) and torch.equal(shift_hue(red, -60), blue)
    assert torch.equal(shift_hue(red, 180), red)  # hue wraps modulo 180
    muted = colour(200, 100, 100)
    assert torch.equal(scale_saturation(muted, 0.0), colour(200, 200, 200))
    assert torch.equal(scale_saturation(muted, 2.0), colour(200, 0, 0))
    assert torch.equal(shift_hue(scale_saturation(muted, 1.0), 0), muted)


def test_test_transform_pads_centrally_with_the_fill_values():
    sample = _class_coded_sample(5, 7)
    sample["semseg"][:, :4, :4] = 1  # no ignore pixel inside, so every 255 below is padding
    out = DenseTestTransform((8, 12))(sample)
    assert out["meta"]["pad"] == (1, 2, 2, 3)  # top, bottom, left, right
    inside = (slice(None), slice(1, 6), slice(2, 9))
    border = torch.ones(8, 12, dtype=torch.bool)
    border[1:6, 2:9] = False
    assert torch.equal(out["image"][inside], normalize(sample["image"]))
    assert (out["image"][:, border] == 0).all()
    for task in ("semseg", "human_parts", "sal", "edge", "normals", "depth"):
        assert out[task].shape[1:] == (8, 12), task
        assert (out[task][:, border] == IGNORE_INDEX).all(), task  # normals and depth via the ignore rule
        assert torch.equal(out[task][inside], sample[task]), task


def test_test_transform_never_resizes():
    with pytest.raises(ValueError, match="does not fit the input size"):
        DenseTestTransform((8, 8))(_class_coded_sample(10, 6))


def test_train_transform_is_deterministic_under_a_fixed_generator():
    sample = _class_coded_sample()
    transform = DenseTrainTransform((32, 40))

    def run(seed):
        return transform(sample, torch.Generator().manual_seed(seed))

    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(a[k], b[k]) for k in a if k != "meta")
    assert not all(torch.equal(a[k], c[k]) for k in a if k != "meta")
    torch.manual_seed(9)
    d = transform(sample)
    torch.manual_seed(9)
    e = transform(sample)
    assert all(torch.equal(d[k], e[k]) for k in d if k != "meta")


def test_default_input_sizes_and_a_batched_loader(pascal, nyud):
    sample = build_dense_transform("pascalcontext", train=False)(PascalContext(pascal.root, "val")[0])
    assert sample["image"].shape == (3, *get_dataset("pascalcontext").input_size)
    sample = build_dense_transform("nyud", train=True)(NYUDv2(nyud.root, "val")[0])
    assert sample["depth"].shape == (1, *get_dataset("nyud").input_size)

    dataset = PascalContext(pascal.root, "train", transform=DenseTrainTransform((32, 48)))
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert batch["image"].shape == (2, 3, 32, 48) and batch["normals"].shape == (2, 3, 32, 48)
    assert batch["meta"]["id"] == pascal.splits["train"][:2]
