"""The VidPrism head reproduces the reference outputs of the released code (fixtures/vidprism_official)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prism_vfm.video import HeadConfig, VidPrismHead, load_official_head, released_loss
from prism_vfm.video.dbi import DBI
from prism_vfm.video.official import to_released_key, to_released_state_dict
from tests.video_fixtures import (
    dbi_case_state_dict,
    manifest,
    reference,
    released_head,
    released_state_dict,
    released_state_dicts,
)
from tests.video_reference import reference_forward, reference_loss

TOL = 1e-5  # float tensors, absolute; losses: absolute or relative, whichever is larger


pytestmark = pytest.mark.usefixtures("one_thread")


def close(name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    ours = ours.detach().cpu()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    if ref.dtype == torch.int64:
        assert torch.equal(ours.long(), ref), f"{name}: {ours.tolist()} != {ref.tolist()}"
        return
    limit = tol * max(1.0, ref.abs().max().item()) if ref.dim() == 0 else tol
    diff = (ours - ref).abs().max().item()
    assert diff <= limit, f"{name}: max |diff| {diff:.3g} > {limit:.3g}"


def head_quantities(out) -> dict[str, torch.Tensor]:
    """Our head's output under the fixture names."""
    q = {
        "readout_attn": out.readout_attention,
        "f": out.fused,
        "gating_weights": out.gates,
        "E_bnd": out.expert_summaries,
        "logits": out.logits,
        "L_div": out.aux_losses["diversity"],
        "L_rank": out.aux_losses["rank"],
        "dbi.pair_scores": out.dbi.pair_scores,
        "dbi.pair_passed": out.dbi.pair_passed,
        "dbi.last_writer": out.dbi.last_writer,
    }
    if out.embedding is not None:
        q["z"] = out.embedding
    for r, s in enumerate(out.streams):
        q[f"rgsta.{r}.out"], q[f"rgsta.{r}.kept_index"], q[f"rgsta.{r}.kept_frame"] = (
            s.tokens,
            s.kept_index,
            s.kept_frame,
        )
        q[f"rgsta.{r}.s_pred"], q[f"rgsta.{r}.s_mix"] = s.s_pred, s.s_mix
        q[f"dbi.{r}.out"], q[f"expert.{r}.out"] = out.dbi.streams[r], out.expert_outputs[r]
    return q


def check_eval(name: str, text_key: str | None) -> dict[str, torch.Tensor]:
    ref = reference(name)
    head = released_head(name)
    assert not head.training
    text = ref[text_key] if text_key else None
    with torch.no_grad():
        out = head(ref["input"], text)
    ours = head_quantities(out)
    for key, value in ours.items():
        close(key, value, ref[key])
    inputs = {"input", "labels", "text_embeddings", "text_embeds"}
    assert set(ours) == {k for k in ref if not k.startswith("train.") and k not in inputs}
    assert out.aux_losses["rank"].item() == 0.0  # exactly 0 in eval mode
    return ref


def test_closed_head_reproduces_every_eval_quantity():
    check_eval("head_d512_t32", None)


def test_text_variant_reproduces_every_eval_quantity():
    check_eval("text_variant_d768", "text_embeds")


def test_closed_head_train_mode_loss_terms():
    ref = reference("head_d512_t32")
    head = released_head("head_d512_t32").train()
    out = head(ref["input"])
    loss = released_loss(out, ref["labels"], ref["text_embeddings"])
    names = {"ce": "L_ce", "gate": "L_gate", "text": "L_con", "diversity": "L_div", "rank": "L_rank"}
    assert set(loss.terms) == set(names)
    for ours, theirs in names.items():
        close(f"train.{theirs}", loss.terms[ours], ref[f"train.{theirs}"])
    close("train.loss", loss.total, ref["train.loss"])
    for r, stream in enumerate(out.streams):
        close(f"train.rgsta.{r}.L_rank", stream.rank_loss, ref[f"train.rgsta.{r}.L_rank"])
        close(f"train.rgsta.{r}.kept_index", stream.kept_index, ref[f"train.rgsta.{r}.kept_index"])
    close("train.dbi.pair_passed", out.dbi.pair_passed, ref["train.dbi.pair_passed"])
    for key, ours in (("logits", out.logits), ("gating_weights", out.gates), ("z", out.embedding)):
        close(f"train.{key}", ours, ref[f"train.{key}"])
    per_video = F.normalize(out.embedding, dim=1) @ F.normalize(ref["text_embeddings"], dim=1).t()
    close("train.logits_per_video", per_video, ref["train.logits_per_video"])


def test_closed_head_gradients_match_release():
    """The same 50 tensors get no gradient; every other gradient's L2 norm within 1e-3 relative."""
    ref = reference("head_d512_t32")
    info = manifest("head_d512_t32")["info"]["train_backward"]
    head = released_head("head_d512_t32").train()
    released_loss(head(ref["input"]), ref["labels"], ref["text_embeddings"]).total.backward()
    grads = {k: p.grad for k, p in to_released_named_parameters(head).items()}
    assert sorted(k for k, g in grads.items() if g is None) == sorted(info["grad_none_keys"])
    compared = 0
    for key, norm in info["grad_l2_norms"].items():
        if norm < 1e-6:  # mathematically zero (the RgSTA score LayerNorm bias): float32 noise
            continue
        ours = grads[key].norm().item()
        assert abs(ours - norm) <= 1e-3 * norm, f"{key}: grad norm {ours} != {norm}"
        compared += 1
    assert compared >= 90


def to_released_named_parameters(head: VidPrismHead) -> dict[str, torch.nn.Parameter]:
    names = dict(zip(head.state_dict().keys(), to_released_state_dict(head).keys(), strict=True))
    return {names[k]: p for k, p in head.named_parameters()}


def test_text_variant_train_mode_rank_losses():
    ref = reference("text_variant_d768")
    head = released_head("text_variant_d768").train()
    out = head(ref["input"], ref["text_embeds"])
    close("train.L_rank", out.aux_losses["rank"], ref["train.L_rank"])
    close("train.L_div", out.aux_losses["diversity"], ref["train.L_div"])
    for r, stream in enumerate(out.streams):
        close(f"train.rgsta.{r}.L_rank", stream.rank_loss, ref[f"train.rgsta.{r}.L_rank"])
    for key, ours in (("logits", out.logits), ("z", out.embedding), ("E_bnd", out.expert_summaries)):
        close(f"train.{key}", ours, ref[f"train.{key}"])


CASES = ["all_pass", "last_sources_fail", "no_writer_for_1_and_3", "batch_mean_decides"]


@pytest.mark.parametrize("case", CASES)
def test_dbi_threshold_cases(case):
    ref = reference("dbi_threshold_cases")
    info = manifest("dbi_threshold_cases")["info"]["cases"][case]
    dbi = DBI(64, (2, 4, 8, 16))
    dbi.load_state_dict(dbi_case_state_dict(case), strict=True)
    streams = [ref[f"input.{i}"] for i in range(4)]
    out = dbi(streams)
    for j in range(4):
        close(f"{case}.out.{j}", out.streams[j], ref[f"{case}.out.{j}"])
    close(f"{case}.pair_scores", out.pair_scores, ref[f"{case}.pair_scores"])
    close(f"{case}.pair_passed", out.pair_passed, ref[f"{case}.pair_passed"])
    close(f"{case}.last_writer", out.last_writer, ref[f"{case}.last_writer"])
    sum(o.sum() for o in out.streams).backward()
    none = sorted(to_released_key("dbi." + k) for k, p in dbi.named_parameters() if p.grad is None)
    assert none == sorted("dynamic_interaction." + k for k in info["grad_none_keys_after_sum_backward"])


@pytest.mark.parametrize("name", ["head_d512_t32", "text_variant_d768"])
def test_reference_oracle_reproduces_the_fixture(name):
    """The loop-per-window oracle the fast head is tested against is itself the released computation."""
    ref = reference(name)
    head = released_head(name)
    text = ref.get("text_embeds")
    with torch.no_grad():
        out = reference_forward(head, ref["input"], text)
    for key in ("logits", "gating_weights", "f", "readout_attn", "E_bnd", "dbi.pair_scores", "L_div"):
        close(key, out[key], ref[key])
    for r in range(4):
        for part in ("out", "kept_index"):
            close(f"rgsta.{r}.{part}", out[f"rgsta.{r}.{part}"], ref[f"rgsta.{r}.{part}"])
        close(f"expert.{r}.out", out[f"expert.{r}.out"], ref[f"expert.{r}.out"])
    if name == "head_d512_t32":
        head.train()
        terms = reference_loss(reference_forward(head, ref["input"]), ref["labels"], ref["text_embeddings"])
        for key, value in terms.items():
            close(key, value, ref[f"train.{'loss' if key == 'loss' else key}"])


@pytest.mark.parametrize("name", ["head_d512_t32", "text_variant_d768"])
def test_load_official_head_reads_the_architecture_from_the_keys(name):
    sd = released_state_dict(name)
    construction = manifest(name)["construction"]["kwargs"]
    head = load_official_head(sd)
    assert head.cfg.dim == construction["d_model"]
    assert head.cfg.rates == tuple(construction["sampling_rates"])
    assert head.cfg.variant == ("text" if name.startswith("text") else "closed")
    assert head.cfg.num_classes == sd["head.weight"].shape[0]
    assert sum(p.numel() for p in head.parameters()) == manifest(name)["parameters"]["parameter_count"]
    # the released names round-trip, in the released order
    assert list(to_released_state_dict(head)) == list(sd)
    # a whole training checkpoint, DDP-prefixed, loads the same head
    wrapped = {"fusion_model_state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}
    again = load_official_head(wrapped)
    assert all(
        torch.equal(a, b)
        for a, b in zip(head.state_dict().values(), again.state_dict().values(), strict=True)
    )


def test_load_official_head_videomae_variant():
    sd = {
        k: v for k, v in released_state_dict("head_d512_t32").items() if not k.startswith("projection_head.")
    }
    head = load_official_head(sd)
    assert head.cfg.variant == "videomae" and head.projection is None
    ref = reference("head_d512_t32")
    with torch.no_grad():
        out = head(ref["input"])
    assert out.embedding is None
    close("logits", out.logits, ref["logits"])  # the same network without its projection


def test_load_official_head_rejects_other_architectures_listing_keys():
    sd = released_state_dict("head_d512_t32")
    prism_like = {"blocks.0.attn.qkv.weight": torch.zeros(3, 3), "patch_embed.proj.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight"):
        load_official_head(prism_like)
    missing = {k: v for k, v in sd.items() if not k.startswith("mote.readout_gate.")}
    with pytest.raises(ValueError, match=r"missing .*mote\.readout_gate\.attn\.in_proj_weight"):
        load_official_head(missing)
    extra = dict(sd, **{"visual.proj": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected visual\.proj"):
        load_official_head(extra)
    wrong = dict(sd, **{"head.bias": torch.zeros(7)})
    with pytest.raises(ValueError, match=r"head\.bias \(7,\) \(expected \(101,\)\)"):
        load_official_head(wrong)
    five = dict(
        sd, **{f"pooling_layers.4.{k}": v for k, v in sd.items() if k.startswith("pooling_layers.0.")}
    )
    with pytest.raises(ValueError, match="pass rates="):
        load_official_head(five)


def test_head_config_from_fixture_builds_the_same_parameter_count():
    for name in ("head_d512_t32", "text_variant_d768"):
        kw = manifest(name)["construction"]["kwargs"]
        variant = "text" if name.startswith("text") else "closed"
        classes = 400 if variant == "text" else kw["num_classes"]
        cfg = HeadConfig(
            dim=kw["d_model"], num_classes=classes, rates=tuple(kw["sampling_rates"]), variant=variant
        )
        count = sum(p.numel() for p in VidPrismHead(cfg).parameters())
        assert count == manifest(name)["parameters"]["parameter_count"]


def test_videoclip_tiny_t8_head_quantities_from_its_frame_embeddings():
    """The tiny whole-pipeline fixture at T = 8: the rate-16 window is the whole clip, both slow streams
    are one token long; every head quantity from the stored per-frame embeddings."""
    ref = reference("videoclip_tiny_t8")
    head = load_official_head(released_state_dicts("videoclip_tiny_t8")["fusion_model"])
    with torch.no_grad():
        out = head(ref["frame_embeddings"])
    assert [s.tokens.shape[1] for s in out.streams] == [4, 2, 1, 1]
    ours = head_quantities(out)
    for key, value in ours.items():
        close(key, value, ref[f"head.{key}"])
    assert {f"head.{k}" for k in ours} == {k for k in ref if k.startswith("head.")}
