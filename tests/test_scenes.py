"""Rendered scenes: the ground truth is geometrically exact and the release readers load it as written."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from prism_vfm.data.nyud import NYUDv2
from prism_vfm.data.pascal_context import PascalContext
from prism_vfm.data.scene_sets import (
    STREAMS,
    write_scene_images,
    write_scene_nyud,
    write_scene_pascal,
)
from prism_vfm.data.scenes import BACKGROUND_CLASSES, CLASS_INDEX, SCENE_CLASSES, render_scene

SIZE = (48, 64)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    pascal = write_scene_pascal(root / "PASCALContext", n_train=3, n_val=3, size=SIZE, seed=7)
    nyud = write_scene_nyud(root / "NYUDv2", n_train=3, n_val=3, size=SIZE, seed=7)
    return pascal, nyud


def normals_from_depth(depth: np.ndarray, focal: float) -> np.ndarray:
    """Unit normals from central differences of the back-projected depth, in the stored convention
    (x right, y down, z towards the camera), oriented towards the camera."""
    h, w = depth.shape
    v, u = np.mgrid[:h, :w] + 0.5
    points = np.stack([(u - w / 2) / focal * depth, (v - h / 2) / focal * depth, depth], axis=-1)
    du = np.zeros_like(points)
    dv = np.zeros_like(points)
    du[:, 1:-1] = points[:, 2:] - points[:, :-2]
    dv[1:-1] = points[2:] - points[:-2]
    n = np.cross(du, dv)
    n /= np.linalg.norm(n, axis=-1, keepdims=True) + 1e-12
    n *= np.where((n * points).sum(-1, keepdims=True) > 0, -1.0, 1.0)  # face the camera
    n[..., 2] *= -1  # camera z forward → stored z towards the camera
    return n


@pytest.mark.parametrize("index", range(6))
def test_normals_agree_with_the_depth_on_planar_faces(index):
    scene = render_scene(3, index, SIZE)
    # Pixels whose 3x3 neighbourhood lies on one planar face (floor, a wall, a box face, a cylinder top).
    same = ndimage.minimum_filter(scene.surface, 3) == ndimage.maximum_filter(scene.surface, 3)
    planar = same & (scene.surface >= 0)
    planar[[0, -1]] = False
    planar[:, [0, -1]] = False
    assert planar.sum() > 0.3 * planar.size
    expected = normals_from_depth(scene.depth.astype(np.float64), scene.focal)
    cos = (expected[planar] * scene.normals[planar]).sum(-1)
    angle = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    assert np.percentile(angle, 99) < 0.5 and angle.max() < 2.0
    np.testing.assert_allclose(np.linalg.norm(scene.normals, axis=-1), 1.0, atol=1e-5)


def test_floor_and_walls_have_the_orientation_the_release_files_use():
    scene = render_scene(0, 0, SIZE)
    floor = scene.normals[scene.labels == CLASS_INDEX["floor"]]
    assert (floor[:, 1] < -0.8).all()  # up is negative y (y points down)
    back_wall = scene.normals[(scene.labels == CLASS_INDEX["wall"]) & (np.abs(scene.normals[..., 0]) < 0.1)]
    assert (back_wall[:, 2] > 0.9).all()  # facing the camera is +z


def test_nyud_boundaries_are_exactly_where_labels_change(written):
    _, nyud = written
    reader = NYUDv2(nyud.root, "val", ["semseg", "edge"])
    for i, sample_id in enumerate(reader.ids):
        sample = reader[i]
        labels = sample["semseg"][0].numpy()
        change = np.zeros(labels.shape, dtype=bool)
        change[:, :-1] |= labels[:, :-1] != labels[:, 1:]
        change[:-1] |= labels[:-1] != labels[1:]
        np.testing.assert_array_equal(sample["edge"][0].numpy() > 0.5, change)
        np.testing.assert_array_equal(reader.boundary_gt(sample_id), change)
        assert change.any()


def test_pascal_boundaries_lie_on_label_changes(written):
    pascal, _ = written
    reader = PascalContext(pascal.root, "val", ["edge"])
    for i, sample_id in enumerate(reader.ids):
        edge = reader[i]["edge"][0].numpy() > 0.5
        label_map = np.pad(reader.label_map(sample_id), 1, mode="reflect")
        centre = label_map[1:-1, 1:-1]
        differs = np.zeros(centre.shape, dtype=bool)
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            differs |= (
                label_map[1 + dy : 1 + dy + centre.shape[0], 1 + dx : 1 + dx + centre.shape[1]] != centre
            )
        assert edge.any() and not (edge & ~differs).any()


def test_saliency_is_the_foreground_objects_and_parts_lie_on_the_figure(written):
    pascal, _ = written
    reader = PascalContext(pascal.root, "train", ["semseg", "human_parts", "sal"])
    for i in range(len(reader)):
        sample = reader[i]
        semseg, parts = sample["semseg"][0].numpy(), sample["human_parts"][0].numpy()
        np.testing.assert_array_equal(sample["sal"][0].numpy() > 0.5, semseg > 0)
        assert not ((parts > 0) & (semseg != SCENE_CLASSES[CLASS_INDEX["person"]].voc)).any()
        if reader.ids[i] in pascal.person_ids:
            assert (parts > 0).sum() == (semseg == 15).sum() > 0


def test_readers_load_what_was_rendered(written):
    pascal, nyud = written
    n_train = len(pascal.splits["train"])
    p_reader = PascalContext(pascal.root, "val", ["semseg", "normals"])
    n_reader = NYUDv2(nyud.root, "val", ["semseg", "normals", "depth"])
    voc = np.array([c.voc for c in SCENE_CLASSES])
    nyu = np.array([c.nyu for c in SCENE_CLASSES])
    for i in range(len(p_reader)):
        scene = render_scene(7, n_train + i, SIZE, STREAMS["pascalcontext"])
        sample = p_reader[i]
        np.testing.assert_array_equal(sample["semseg"][0].numpy(), voc[scene.labels])
        normals = sample["normals"].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(normals, scene.normals, atol=1.0 / 127.5 + 1e-6)
        assert tuple(sample["image"].shape) == (3, *SIZE)
    for i in range(len(n_reader)):
        scene = render_scene(7, n_train + i, SIZE, STREAMS["nyud"])
        sample = n_reader[i]
        np.testing.assert_array_equal(sample["semseg"][0].numpy(), nyu[scene.labels] - 1)
        np.testing.assert_array_equal(sample["depth"][0].numpy(), scene.depth)
        assert (scene.depth > 0).all() and (scene.depth < 80).all()


def test_scenes_are_deterministic_per_seed(tmp_path):
    a, b, other = render_scene(5, 2, SIZE), render_scene(5, 2, SIZE), render_scene(6, 2, SIZE)
    for field in ("image", "depth", "normals", "labels", "parts"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.image, other.image)
    first = write_scene_images(tmp_path / "a", n=3, size=SIZE, seed=1)
    second = write_scene_images(tmp_path / "b", n=3, size=SIZE, seed=1)
    for path in sorted(first.iterdir()):
        assert path.read_bytes() == (second / path.name).read_bytes()


def test_bad_sizes_and_counts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="size"):
        render_scene(0, 0, (4, 64))
    with pytest.raises(ValueError, match="zoom"):
        render_scene(0, 0, SIZE, zoom=0.0)
    with pytest.raises(ValueError, match="at least one"):
        write_scene_pascal(tmp_path, n_train=0, n_val=1)
    with pytest.raises(ValueError, match="at least one"):
        write_scene_images(tmp_path, n=0)


def test_zoom_frames_the_same_scenes_closer():
    def foreground(zoom: float) -> float:
        fractions = []
        for index in range(12):
            labels = render_scene(3, index, SIZE, zoom=zoom).labels
            fractions.append(np.isin(labels, sorted(BACKGROUND_CLASSES), invert=True).mean())
        return float(np.mean(fractions))

    assert foreground(1.6) > 1.5 * foreground(1.0)
    assert np.array_equal(render_scene(3, 0, SIZE, zoom=1.0).image, render_scene(3, 0, SIZE).image)
