"""Per-teacher distillation gradients: routed experts hear only the teachers that route to them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from prism_vfm.analysis import gradient_conflict, plot_gradient_conflict
from prism_vfm.losses.distill import DistillLoss
from prism_vfm.teachers import build_teacher
from tests.analysis_models import analysis_student, image_batches, route_by_context

DISJOINT = [[0, 1], [2, 3], [4, 5]]
SAME = [[0, 1], [0, 1], [0, 1]]


@pytest.fixture(scope="module")
def teachers():
    torch.manual_seed(1)
    return [build_teacher("tiny_c", 32, "none") for _ in range(3)]  # width 16, three random draws


def rows(conflict, name):
    return np.array([m == name for m in conflict.module])


def test_routed_experts_get_gradient_only_from_the_teachers_routed_to_them(teachers):
    model = route_by_context(analysis_student(), {1: DISJOINT, 3: SAME})
    conflict = gradient_conflict(model, image_batches(2, batch=2), teachers, teacher_names=["D", "C", "S"])
    # blocks 0 and 2 dense; blocks 1 and 3: six experts, shared, anchor — per batch
    assert conflict.norms.shape == (2 * 18, 3) and conflict.cosines.shape == (2 * 18, 3, 3)
    norm = conflict.normalized_norms()
    for e in range(6):
        owner = e // 2
        sel = rows(conflict, f"block 1 expert {e}")
        np.testing.assert_array_equal(norm[sel], np.eye(3)[[owner, owner]])
        assert np.isnan(conflict.cosines[sel][:, 0, 1]).all()  # one gradient is zero: no cosine
    for e in (0, 1):  # every teacher routes here
        assert (conflict.norms[rows(conflict, f"block 3 expert {e}")] > 0).all()
    for e in (2, 3, 4, 5):  # nobody routes here
        assert (conflict.norms[rows(conflict, f"block 3 expert {e}")] == 0).all()
    inter = conflict.interaction_by_layer()
    assert inter[1]["routed"] == pytest.approx(1.0)
    assert inter[3]["routed"] > 1.5 and inter[1]["shared"] > 1.5 and inter[1]["anchor"] > 1.5
    assert inter[0]["dense"] > 1.5
    summary = conflict.to_dict()
    assert summary["by_kind"]["routed"]["unreached"] == 2 * 4
    assert summary["by_kind"]["routed"]["cosine"]["D–C"]["mean"] == pytest.approx(
        float(conflict.pair_cosines(0, 1, "routed").mean())
    )
    assert conflict.pair_cosines(0, 1, "routed").size == 2 * 2  # block 3 experts 0 and 1, two batches


def test_one_teacher_twice_gives_identical_gradients(teachers):
    model = route_by_context(analysis_student(), {1: SAME, 3: SAME})
    with torch.no_grad():
        model.projectors[1].load_state_dict(model.projectors[0].state_dict())
    conflict = gradient_conflict(model, image_batches(1, batch=2), [teachers[0], teachers[0]])
    reached = conflict.norms.max(1) > 0
    np.testing.assert_allclose(conflict.cosines[reached][:, 0, 1], 1.0, atol=1e-6)
    np.testing.assert_allclose(conflict.normalized_norms()[reached], 1.0, atol=1e-6)
    assert conflict.teacher_names == ["teacher 0", "teacher 1"]


def test_gradient_norms_are_those_of_the_teachers_distillation_loss(teachers):
    model = route_by_context(analysis_student(), {1: DISJOINT, 3: SAME})
    x = image_batches(1, batch=2)[0]
    conflict = gradient_conflict(model, [x], teachers[:2])
    proj = model.project(model(x, 1).taps, 1, (4, 4))
    loss = DistillLoss("cos+l1")({1: proj}, {1: teachers[1](x)})["total"]
    params = list(model.blocks[1].anchor.parameters())
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]).norm()
    assert conflict.norms[rows(conflict, "block 1 anchor")][0, 1] == pytest.approx(float(expected), rel=1e-5)
    assert all(p.grad is None for p in model.parameters())  # the model's .grad are left alone


def test_plot_and_errors(teachers, tmp_path):
    model = route_by_context(analysis_student(), {1: DISJOINT, 3: SAME})
    conflict = gradient_conflict(model, image_batches(1, batch=2), teachers)
    with Image.open(plot_gradient_conflict(conflict, tmp_path / "grad.png")) as im:
        assert im.format == "PNG"
    with pytest.raises(ValueError, match="at least two"):
        gradient_conflict(model, image_batches(1), teachers[:1])
    with pytest.raises(ValueError, match="projector heads"):
        gradient_conflict(analysis_student(projectors=False), image_batches(1), teachers)
    with pytest.raises(ValueError, match=r"unknown teacher context id\(s\) \[5\]"):
        gradient_conflict(model, image_batches(1), teachers[:2], contexts=[0, 5])
