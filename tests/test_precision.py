"""Precision chosen from the device's support, fp16 loss scaling, half-precision steps of both stages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prism_vfm.config import apply_overrides
from prism_vfm.data.synthetic import write_tiny_image_folder
from prism_vfm.data.tiny_dense import write_tiny_pascal
from prism_vfm.distill.config import preset
from prism_vfm.distill.trainer import train_stage1
from prism_vfm.finetune.config import preset as stage2_preset
from prism_vfm.finetune.trainer import train_stage2
from prism_vfm.train.checkpoint import latest_checkpoint, load_checkpoint
from prism_vfm.train.logging import read_scalars
from prism_vfm.train.precision import MixedPrecision, choose_precision
from tests.tiny import tiny_student

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")


def fake_gpu(monkeypatch, major: int, name: str) -> None:
    """A GPU of compute capability ``major``.x, as torch reports it (bf16 "supported" through emulation)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (major, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: major >= 8 or including_emulation
    )


@pytest.mark.parametrize(
    "major, name, auto, auto_sharded",
    [
        (9, "H200", "bf16", "bf16"),
        (8, "A100", "bf16", "bf16"),
        (7, "V100", "fp16", "fp32"),
        (6, "P100", "fp32", "fp32"),
    ],
)
def test_auto_follows_what_the_gpu_computes_natively(monkeypatch, major, name, auto, auto_sharded):
    fake_gpu(monkeypatch, major, name)
    assert choose_precision("auto", CUDA) == auto
    assert choose_precision("auto", CUDA, sharded=True) == auto_sharded
    assert choose_precision("fp32", CUDA) == "fp32" and choose_precision("fp16", CUDA) == "fp16"
    if major >= 8:
        assert choose_precision("bf16", CUDA) == "bf16"
    else:
        with pytest.raises(ValueError, match=rf"amp='bf16': {name} has no native bf16"):
            choose_precision("bf16", CUDA)


def test_cpu_trains_in_fp32_unless_asked_and_bad_settings_are_named():
    assert choose_precision("auto", CPU) == "fp32"
    assert choose_precision("bf16", CPU) == "bf16" and choose_precision("fp16", CPU) == "fp16"
    with pytest.raises(ValueError, match="amp='fp16' is not supported with fsdp"):
        choose_precision("fp16", CPU, sharded=True)
    with pytest.raises(ValueError, match="amp must be one of auto, bf16, fp16, fp32, got 'fp8'"):
        choose_precision("fp8", CPU)
    assert not MixedPrecision("bf16", CPU).scaler.is_enabled()
    assert MixedPrecision("fp16", CPU).scaler.is_enabled()


def _problem() -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Linear(4, 3), torch.randn(8, 4)


def test_fp16_scales_the_loss_and_unscales_before_clipping():
    reference, x = _problem()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    (reference(x) ** 2).mean().backward()
    true_grads = [p.grad.clone() for p in reference.parameters()]
    true_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
    ref_opt.step()

    model, x = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    precision = MixedPrecision("fp16", CPU)
    scale = precision.scaler.get_scale()
    assert scale > 1
    precision.backward((model(x) ** 2).mean())
    # Backward ran on the scaled loss …
    for p, g in zip(model.parameters(), true_grads, strict=True):
        torch.testing.assert_close(p.grad, g * scale)
    norm = precision.step(opt, model.parameters(), 0.05)
    # … and clipping saw the true gradients: the same norm and the same clipped update as in fp32.
    assert float(norm) == pytest.approx(float(true_norm), rel=1e-5)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_fp16_skips_a_step_whose_gradients_overflowed_and_keeps_its_scale_in_checkpoints():
    model, x = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    precision = MixedPrecision("fp16", CPU)
    scale = precision.scaler.get_scale()
    precision.backward((model(x) ** 2).mean())
    model.bias.grad[0] = float("inf")
    precision.step(opt, model.parameters(), 1.0)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)
    assert precision.scaler.get_scale() == scale / 2
    restored = MixedPrecision("fp16", CPU)
    restored.load_state_dict(precision.state_dict())
    assert restored.scaler.get_scale() == scale / 2
    assert MixedPrecision("fp32", CPU).state_dict() == {}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    write_tiny_image_folder(root / "images", n_classes=3, per_class=8, size=(40, 48), seed=0)
    write_tiny_pascal(root / "PASCALContext", n_train=6, n_val=2, size=(40, 48), seed=0)
    tiny_student(teacher_dims=(32, 24, 16)).save_pretrained(root / "stage1")
    return root


def _stage1(data, out, amp):
    over = [
        ("data", str(data / "images")),
        ("out", str(out)),
        ("max_steps", 2),
        ("log_every", 1),
        ("amp", amp),
    ]
    return train_stage1(apply_overrides(preset("tiny"), over))


def _stage2(data, out, amp):
    over = [
        ("data", str(data / "PASCALContext")),
        ("init", str(data / "stage1")),
        ("out", str(out)),
        ("max_steps", 2),
        ("log_every", 1),
        ("amp", amp),
    ]
    return train_stage2(apply_overrides(stage2_preset("tiny"), over))


@pytest.mark.parametrize("stage", [_stage1, _stage2], ids=["stage1", "stage2"])
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_half_precision_training_steps_of_both_stages(data, tmp_path, stage, amp):
    losses = {}
    for name in ("fp32", amp):
        run = stage(data, tmp_path / name, name)
        losses[name] = [r["loss/total"] for r in read_scalars(run) if "loss/total" in r]
    assert len(losses[amp]) == 2 and all(torch.isfinite(torch.tensor(losses[amp])))
    # The forward really ran in half precision: close to fp32, not equal to it.
    assert losses[amp] != losses["fp32"]
    assert losses[amp] == pytest.approx(losses["fp32"], rel=0.05)
    _, state = load_checkpoint(latest_checkpoint(tmp_path / amp))
    assert bool(state["scaler"]) == (amp == "fp16")  # the loss scale is kept for resuming
