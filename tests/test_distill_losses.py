"""Stage-1 distillation and decorrelation losses against the official `stage1_losses` fixture.

Every scalar of `reference.json` for the distillation cases is reproduced: both `DistillLoss` variants, the
cosine / smooth-L1 parts of every (teacher, tap) term, and the decorrelation value of every student map.
Inputs not stored (the C = 1024 case; in the slimmed copy also the 64 x 64 teacher maps) are regenerated
from the manifest's recipe and hash-checked.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from prism_vfm.losses.decorrelation import DecorrelationLoss
from prism_vfm.losses.distill import DistillLoss, align_maps, distillation_criterion, feature_distill_loss
from tests.conftest import load_json

STORED_CASES = ("stored_c64", "teacher_smaller_c64")
CASES = (*STORED_CASES, "generated_c1024")
VARIANTS = ("cos+l1", "cos+l1+decorrelation")


@dataclass(frozen=True)
class Case:
    name: str
    student: dict[str, list[torch.Tensor]]
    teacher: dict[str, list[torch.Tensor]]
    reference: dict


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _seeded_randn(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode("utf-8")))
    return torch.randn(shape, generator=g)


def _generate(case: str, layout: dict) -> dict[str, torch.Tensor]:
    """The manifest's `input_generation` recipe, tensors named `<case>.<role>.<t>.<l>`."""
    b, c, levels = layout["batch_per_teacher"], layout["channels"], layout["levels"]
    h, w = layout["student_hw"]
    tensors = {}
    for ti, t in enumerate(layout["dict_key_order"]):
        big_h, big_w = layout["teacher_hw"][t]
        for l in range(levels):
            common = _seeded_randn(f"B/{case}/student_common/{t}/{l}", (b, c, 1, 1))
            s = _seeded_randn(f"B/{case}/student/{t}/{l}", (b, c, h, w)) + 0.3 * (1 + 2 * ti + l) * common
            base = s
            if (big_h, big_w) != (h, w):
                base = F.interpolate(s, size=(big_h, big_w), mode="bilinear", align_corners=True)
            noise = _seeded_randn(f"B/{case}/teacher_noise/{t}/{l}", (b, c, big_h, big_w))
            tensors[f"{case}.student.{t}.{l}"] = s
            tensors[f"{case}.teacher.{t}.{l}"] = 0.8 * base + 0.6 * noise
    return tensors


def _load_case(folder: Path, name: str) -> Case:
    """One distillation case, its inputs checked byte for byte against the manifest's SHA-256."""
    manifest = load_json(folder / "manifest.json")
    layout = manifest["layouts"][name]
    tensors = {}
    if layout["stored_in_safetensors"]:
        tensors = {k: v for k, v in load_file(folder / "inputs.safetensors").items() if k.startswith(name)}
    expected = manifest["input_generation"]["sha256_of_every_generated_tensor"]
    wanted = {k: v for k, v in expected.items() if k.startswith(f"{name}.")}
    if wanted.keys() - tensors.keys():  # not stored (C = 1024; the slimmed copy's large maps): regenerate
        tensors = {**_generate(name, layout), **tensors}
    assert sorted(tensors) == sorted(wanted)
    for key, meta in wanted.items():
        assert list(tensors[key].shape) == meta["shape"], key
        assert _sha256(tensors[key]) == meta["sha256"], f"{key} differs from the manifest's recipe"
    order, levels = layout["dict_key_order"], layout["levels"]
    student = {t: [tensors[f"{name}.student.{t}.{l}"] for l in range(levels)] for t in order}
    teacher = {t: [tensors[f"{name}.teacher.{t}.{l}"] for l in range(levels)] for t in order}
    return Case(name, student, teacher, load_json(folder / "reference.json")[name])


@pytest.fixture(scope="module", params=CASES)
def case(request, fixture_dir) -> Case:
    return _load_case(fixture_dir("stage1_losses"), request.param)


# The option tests below only need some real maps; the small stored cases keep them fast.
@pytest.fixture(scope="module", params=STORED_CASES)
def stored_case(request, fixture_dir) -> Case:
    return _load_case(fixture_dir("stage1_losses"), request.param)


def _mismatches(actual: dict[str, float], expected: dict[str, float]) -> list[str]:
    """Entries outside the fixture tolerance: 1e-6 absolute or 1e-5 relative, whichever is larger."""
    return [
        f"{k}: got {actual[k]!r}, official {v!r}"
        for k, v in expected.items()
        if abs(actual[k] - v) > max(1e-6, 1e-5 * abs(v))
    ]


@pytest.mark.parametrize("variant", VARIANTS)
def test_distill_loss_reproduces_official_output_dict(case, variant):
    expected = case.reference[f"DistillLoss('{variant}')"]
    out = DistillLoss(variant)(case.student, case.teacher)
    assert set(out) == set(expected)
    assert not _mismatches({k: v.item() for k, v in out.items()}, expected)


@pytest.mark.parametrize("form", ["none", "official"])
def test_configured_criterion_is_the_official_loss(stored_case, form):
    variant = "cos+l1" if form == "none" else "cos+l1+decorrelation"
    out = distillation_criterion(form)(stored_case.student, stored_case.teacher)
    assert not _mismatches(
        {k: v.item() for k, v in out.items()}, stored_case.reference[f"DistillLoss('{variant}')"]
    )


def test_configured_criterion_passes_form_taps_and_weights_on(stored_case):
    crit = distillation_criterion(
        "paper", decorrelation_taps=(1,), decorrelation_weight=2.0, cos_weight=0.5, l1_weight=0.25
    )
    direct = DistillLoss(
        "cos+l1+decorrelation",
        decorrelation=DecorrelationLoss(form="paper"),
        decorrelation_taps=(1,),
        decorrelation_weight=2.0,
        cos_weight=0.5,
        l1_weight=0.25,
    )
    got, want = (
        crit(stored_case.student, stored_case.teacher),
        direct(stored_case.student, stored_case.teacher),
    )
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="decorrelation must be"):
        distillation_criterion("spatial")


def test_per_tap_cosine_and_smooth_l1_parts_match_official(case):
    actual, expected = {}, {}
    for key, ref in case.reference["components_per_teacher_level"].items():
        t, level = key.split("_level")
        s_map, t_map = case.student[t][int(level) - 1], case.teacher[t][int(level) - 1]
        aligned_s, aligned_t = align_maps(s_map, t_map)
        assert list(aligned_s.shape) == list(aligned_t.shape) == ref["aligned_shape"], key
        actual[f"{key}.cos"] = feature_distill_loss(aligned_s, aligned_t, 1.0, 0.0).item()
        actual[f"{key}.l1"] = feature_distill_loss(aligned_s, aligned_t, 0.0, 1.0).item()
        actual[f"{key}.combined"] = 0.9 * actual[f"{key}.cos"] + 0.1 * actual[f"{key}.l1"]
        expected[f"{key}.cos"] = ref["cosine_embedding_loss"]
        expected[f"{key}.l1"] = ref["smooth_l1_loss"]
        expected[f"{key}.combined"] = ref["combined_0p9cos_0p1l1"]
    assert not _mismatches(actual, expected)


def test_decorrelation_of_every_student_map_matches_official(case):
    expected = case.reference["DecorrelationLoss(sigma_percentage=0.1) on each student map"]
    decorrelation = DecorrelationLoss()
    actual = {
        f"{t}_level{l + 1}": decorrelation(maps[l]).item()
        for t, maps in case.student.items()
        for l in range(4)
    }
    assert not _mismatches(actual, expected)


def test_decorrelation_teacher_can_be_chosen_and_absent_teacher_gives_zero(stored_case):
    per_map = stored_case.reference["DecorrelationLoss(sigma_percentage=0.1) on each student map"]
    last = list(stored_case.student)[-1]
    chosen = DistillLoss("cos+l1+decorrelation", decorrelation_teacher=int(last))(
        stored_case.student, stored_case.teacher
    )
    expected = 0.5 * (per_map[f"{last}_level1"] + per_map[f"{last}_level2"])
    assert not _mismatches({"dec": chosen["decorrelation_loss"].item()}, {"dec": expected})
    absent = DistillLoss("cos+l1+decorrelation", decorrelation_teacher="7")(
        stored_case.student, stored_case.teacher
    )
    assert absent["decorrelation_loss"].item() == 0.0


def test_teacher_weight_scales_only_that_teachers_terms(stored_case):
    plain = stored_case.reference["DistillLoss('cos+l1')"]
    t = list(stored_case.student)[0]
    out = DistillLoss("cos+l1", teacher_weights={t: 2.0})(stored_case.student, stored_case.teacher)
    expected = {k: (2.0 * v if k.startswith(f"{t}_") else v) for k, v in plain.items() if k != "total"}
    expected["total"] = sum(expected.values())
    assert not _mismatches({k: v.item() for k, v in out.items()}, expected)


def _grid_pairs(h: int, w: int):
    positions = [(r, c) for r in range(h) for c in range(w)]
    for i, (ri, ci) in enumerate(positions):
        for j, (rj, cj) in enumerate(positions):
            yield i, j, (ri - rj) ** 2 + (ci - cj) ** 2


def test_decorrelation_of_orthogonal_grid_vectors_is_zero():
    h, w = 3, 4
    basis = torch.eye(h * w) * torch.linspace(0.5, 3.0, h * w)  # distinct norms: only directions count
    features = basis.T.reshape(1, h * w, h, w)
    assert DecorrelationLoss("official")(features).item() == pytest.approx(0.0, abs=1e-7)
    assert DecorrelationLoss("paper")(features).item() == pytest.approx(0.0, abs=1e-7)


def test_decorrelation_of_parallel_and_antiparallel_vectors_has_closed_form():
    h, w, margin, radius = 4, 5, 0.1, 2.0
    sign = torch.tensor([(-1.0) ** (r + c) for r in range(h) for c in range(w)]).reshape(h, w)
    direction = torch.randn(6)
    features = (direction[:, None, None] * sign * torch.rand(h, w).add(0.5)).unsqueeze(0).repeat(2, 1, 1, 1)
    signs = sign.flatten().tolist()
    sigma = 0.1 * min(h, w)
    # Official form: |cos| = 1 for every pair, so the value is the mean of the Gaussian locality penalty.
    official = sum(1 - math.exp(-d2 / (2 * sigma**2)) for _, _, d2 in _grid_pairs(h, w)) / (h * w) ** 2
    # Paper form: anti-parallel pairs (cos = -1) are not penalised, parallel ones far enough apart are.
    paper = (
        sum((1 - margin) for i, j, d2 in _grid_pairs(h, w) if signs[i] == signs[j] and d2 > radius**2)
        / (h * w) ** 2
    )
    got_official = DecorrelationLoss("official")(features).item()
    got_paper = DecorrelationLoss("paper", margin=margin, radius=radius)(features).item()
    assert got_official == pytest.approx(official, rel=1e-5)
    assert got_paper == pytest.approx(paper, rel=1e-5)


def test_decorrelation_mask_built_under_inference_mode_still_trains():
    features = torch.randn(2, 8, 5, 3)
    with torch.inference_mode():
        DecorrelationLoss()(features)
    trainable = features.clone().requires_grad_(True)
    DecorrelationLoss()(trainable).backward()
    assert trainable.grad is not None and torch.isfinite(trainable.grad).all()


def test_align_maps_resizes_only_the_smaller_map():
    student, big, small = torch.randn(1, 2, 14, 14), torch.randn(1, 2, 16, 16), torch.randn(1, 2, 7, 7)
    s, t = align_maps(student, big)
    assert s.shape[-2:] == (16, 16) and t is big
    s, t = align_maps(student, small)
    assert s is student and t.shape[-2:] == (14, 14)
    s, t = align_maps(student, student)
    assert s is student and t is student


def _small_batch(taps: int = 4, channels: int = 8) -> dict[str, list[torch.Tensor]]:
    return {t: [torch.randn(2, channels, 4, 4) for _ in range(taps)] for t in ("0", "1")}


def test_channel_mismatch_names_teacher_and_tap():
    student, teacher = _small_batch(), _small_batch()
    teacher["1"][2] = torch.randn(2, 9, 4, 4)
    with pytest.raises(ValueError, match=r"teacher '1', tap 2: .*\(B, C\)"):
        DistillLoss()(student, teacher)


def test_missing_tap_names_teacher_and_tap():
    student, teacher = _small_batch(), _small_batch()
    teacher["0"] = teacher["0"][:3]
    with pytest.raises(ValueError, match=r"teacher '0', tap 3: missing on the teacher side"):
        DistillLoss()(student, teacher)
    student = {t: maps[:1] for t, maps in _small_batch().items()}
    teacher = {t: maps[:1] for t, maps in _small_batch().items()}
    with pytest.raises(ValueError, match=r"teacher '0', tap 1: decorrelation tap missing"):
        DistillLoss("cos+l1+decorrelation")(student, teacher)
