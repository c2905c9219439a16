"""Behaviour of the VidPrism head beyond the fixtures: agreement with the released computation on any
frame count and option, parameter counts, order sensitivity, options that change only what they name,
and clear errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from prism_vfm.video import HeadConfig, VidPrismHead, released_loss
from prism_vfm.video.rgsta import RgSTA
from tests.video_reference import reference_forward, reference_loss

D = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def make_head(seed: int = 0, **options) -> VidPrismHead:
    torch.manual_seed(seed)
    head = VidPrismHead(HeadConfig(dim=D, num_classes=5, **options))
    with torch.no_grad():  # larger weights than the init, so that merges, scores and attention vary
        for name, p in head.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3 / p.shape[-1] ** 0.5 * (3 if "score" in name else 1))
    return head


def frames(batch: int = 3, t: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, t, D, generator=torch.Generator().manual_seed(seed))


def same_weights(head: VidPrismHead, **options) -> VidPrismHead:
    other = VidPrismHead(dataclasses.replace(head.cfg, **options))
    other.load_state_dict(head.state_dict())
    return other.train(head.training)


# --- parameter counts (SPEC §6)


@pytest.mark.parametrize(
    ("dim", "variant", "classes", "count"),
    [
        (512, "closed", 400, 18_857_376),
        (512, "closed", 101, 18_703_989),
        (512, "closed", 51, 18_678_339),
        (768, "closed", 400, 42_245_024),
        (768, "closed", 101, 42_015_093),
        (768, "closed", 51, 41_976_643),
        (768, "text", 400, 42_246_560),
        (768, "videomae", 400, 41_063_840),
        (768, "videomae", 101, 40_833_909),
        (1024, "videomae", 400, 72_839_584),
        (1024, "videomae", 51, 72_481_859),
    ],
)
def test_parameter_counts_match_the_release(dim, variant, classes, count):
    head = VidPrismHead(HeadConfig(dim=dim, num_classes=classes, variant=variant))
    assert sum(p.numel() for p in head.parameters()) == count


def test_component_parameter_counts_d512():
    head = VidPrismHead(HeadConfig(dim=512))

    def n(module):
        return sum(p.numel() for p in module.parameters())

    assert [n(m) for m in head.rgsta] == [264_192] * 4
    assert n(head.dbi) == 7_606_800
    assert n(head.dbi.score_mlps) == 2_101_264
    assert n(head.dbi.slow_to_fast) == 262_656
    assert n(head.dbi.fast_to_slow) == 5_242_880
    assert [n(m) for m in head.experts] == [2_102_784] * 4
    assert n(head.readout) == 1_052_160
    assert n(head.projection) == 525_312


# --- agreement with the released computation


def assert_agree(head: VidPrismHead, x: torch.Tensor, text: torch.Tensor | None = None, grads: bool = True):
    labels = torch.arange(x.shape[0]) % 5
    class_text = torch.randn(5, D, generator=torch.Generator().manual_seed(7))
    oracle_head = same_weights(head)
    out = head(x, text)
    ref = reference_forward(oracle_head, x, text)
    torch.testing.assert_close(out.logits, ref["logits"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.gates, ref["gating_weights"], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out.fused, ref["f"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.aux_losses["rank"], ref["L_rank"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.aux_losses["diversity"], ref["L_div"], atol=1e-6, rtol=1e-5)
    for r, s in enumerate(out.streams):
        assert torch.equal(s.kept_index, ref[f"rgsta.{r}.kept_index"]), r
        torch.testing.assert_close(s.tokens, ref[f"rgsta.{r}.out"], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(out.expert_outputs[r], ref[f"expert.{r}.out"], atol=2e-5, rtol=1e-5)
    if out.dbi is not None:
        assert torch.equal(out.dbi.pair_passed.long(), ref["dbi.pair_passed"])
        assert torch.equal(out.dbi.last_writer, ref["dbi.last_writer"])
    if not grads:
        return
    use_text = class_text if out.embedding is not None else None
    released_loss(out, labels, use_text).total.backward()
    reference_loss(ref, labels, use_text)["loss"].backward()
    for (name, p), q in zip(head.named_parameters(), oracle_head.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("t", [32, 16, 8, 12, 9, 5, 3, 1])
def test_any_frame_count_agrees_with_the_released_computation(t):
    """Frame counts the rates do not divide work as released: a shorter last window, one-frame windows
    passed through, the fast→slow convolutions landing on the slow lengths."""
    head = make_head().train()
    x = frames(t=t)
    assert_agree(head, x)
    assert [s.tokens.shape[1] for s in head(x).streams] == [-(-t // r) for r in (2, 4, 8, 16)]


def test_repeated_frames_keep_the_released_frame():
    """Clips shorter than T repeat frames (TSN sampling), so scores tie exactly; the kept frame is the
    one the release's per-window top-1 picks."""
    head = make_head().train()
    base = frames(t=8)
    x = base[:, torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4, 5, 5, 6, 7, 7])]
    out = head(x)
    assert any(k.sum() > 0 for k in (s.kept_index for s in out.streams))
    assert_agree(head, x)


@pytest.mark.parametrize("update", ["last", "sum"])
@pytest.mark.parametrize("training", [True, False])
def test_dbi_updates_agree_with_the_released_loops(update, training):
    head = make_head(dbi_update=update).train(training)
    assert_agree(head, frames(), grads=training)


def test_dbi_off_and_other_variants_agree():
    assert_agree(make_head(dbi=False).train(), frames())
    assert_agree(make_head(variant="videomae").train(), frames(t=16))
    assert_agree(make_head(diversity="inter_expert").train(), frames())
    text = torch.randn(7, D)
    assert_agree(make_head(variant="text").train(), frames(), text)


def test_threshold_failures_agree_with_the_released_loops():
    """Pairs below the batch-mean threshold: the last passing source of the other speed writes."""
    head = make_head().train()
    with torch.no_grad():  # pairs 3→0 and 1→2 (k = 4i + j) fail, as in dbi_threshold_cases
        for k in (12, 6):
            head.dbi.score_mlps[k][2].bias.fill_(-6.0)
    out = head(frames())
    assert out.dbi is not None
    assert out.dbi.last_writer.tolist() == [2, 3, 0, 1]
    assert_agree(head, frames())


def test_released_dbi_leaves_the_overwritten_pairs_without_gradient():
    head = make_head().train()
    released_loss(head(frames()), torch.tensor([0, 1, 2]), torch.randn(5, D)).total.backward()
    no_grad = {k for k, p in head.dbi.named_parameters() if p.grad is None}
    dead_mlps = {0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 14, 15}
    expected = {f"score_mlps.{k}.{i}.{w}" for k in dead_mlps for i in (0, 2) for w in ("weight", "bias")}
    assert no_grad == expected | {"fast_to_slow.0to2.weight", "fast_to_slow.0to3.weight"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_head_on_cuda_agrees_with_the_cpu():
    """The same weights on the GPU (fp32, TF32 off): same selections, pass flags, outputs and gradients."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    head = make_head().train()
    gpu = same_weights(head).cuda()
    x, labels, text = frames(), torch.tensor([0, 1, 2]), torch.randn(5, D)
    a, b = head(x), gpu(x.cuda())
    for s, t in zip(a.streams, b.streams, strict=True):
        assert torch.equal(s.kept_index, t.kept_index.cpu())
    assert torch.equal(a.dbi.pair_passed, b.dbi.pair_passed.cpu())
    torch.testing.assert_close(b.logits.cpu(), a.logits, atol=1e-5, rtol=1e-5)
    released_loss(a, labels, text).total.backward()
    released_loss(b, labels.cuda(), text.cuda()).total.backward()
    for (name, p), q in zip(head.named_parameters(), gpu.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad.cpu(), p.grad, atol=1e-5, rtol=1e-4, msg=name)


# --- RgSTA properties


def test_rgsta_keeps_the_top_mixed_score_and_merges_half_the_rest():
    torch.manual_seed(0)
    module = RgSTA(D, rate=4).eval()
    x = frames(t=16)
    out = module(x)
    windows = x.reshape(3, 4, 4, D)
    assert torch.equal(out.kept_index, out.s_mix.reshape(3, 4, 4).argmax(-1))
    h = module.metric_proj(x)
    s_pred = module.score(module.score_norm(h)).squeeze(-1)
    torch.testing.assert_close(out.s_mix, 0.7 * s_pred + 0.3 * x.norm(dim=-1))
    kept = windows.gather(2, out.kept_index[..., None, None].expand(3, 4, 1, D)).squeeze(2)
    unit = torch.nn.functional.normalize(h, dim=-1).reshape(3, 4, 4, D)
    sim = (unit @ unit.transpose(-1, -2)) * (1 - torch.eye(4))  # zero diagonal, kept in the softmax
    to_kept = torch.softmax(sim / 0.1, -1).gather(-1, out.kept_index[..., None, None].expand(3, 4, 4, 1))
    w = (to_kept / (to_kept + 1e-6)).squeeze(-1)
    assert w.min() > 0.99  # the released normalisation over one kept token: w ≈ 1
    rest = torch.ones(3, 4, 4).scatter(-1, out.kept_index[..., None], 0.0)
    torch.testing.assert_close(out.tokens, kept + 0.5 * ((w * rest).unsqueeze(-1) * windows).sum(2))
    assert out.rank_loss.item() == 0.0
    assert module.train()(x).rank_loss.item() > 0.0


def test_rgsta_window_of_one_frame_passes_through():
    module = RgSTA(D, rate=4).train()
    x = frames(t=9)
    out = module(x)
    assert out.tokens.shape == (3, 3, D)
    assert torch.equal(out.tokens[:, -1], x[:, -1])
    assert out.kept_frame[:, -1].tolist() == [8, 8, 8]


def test_rgsta_is_invariant_to_frame_order_inside_a_window():
    module = make_head().rgsta[2].train()
    x = frames()
    perm = torch.cat([torch.randperm(8) + 8 * w for w in range(4)])
    a, b = module(x), module(x[:, perm])
    torch.testing.assert_close(a.tokens, b.tokens, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(a.rank_loss, b.rank_loss)


# --- order sensitivity (SPEC §1.4)


def test_without_dbi_time_reversal_does_not_change_the_logits():
    head = make_head(dbi=False).eval()
    x = frames()
    with torch.no_grad():
        torch.testing.assert_close(head(x).logits, head(x.flip(1)).logits, atol=2e-6, rtol=1e-6)
        perm = torch.arange(32).reshape(16, 2).flip(-1).flatten()  # inside every window of every rate
        torch.testing.assert_close(head(x).logits, head(x[:, perm]).logits, atol=2e-6, rtol=1e-6)


def test_with_dbi_time_reversal_changes_the_logits():
    head = make_head().eval()
    x = frames()
    with torch.no_grad():
        diff = (head(x).logits - head(x.flip(1)).logits).abs().max().item()
    assert diff > 1e-3


# --- options change what they name and nothing else


def test_dbi_update_sum_changes_only_targets_with_several_passing_sources():
    last = make_head().train()
    with torch.no_grad():  # 2→1 and 0→3 (k = 4i + j) fail: targets 1 and 3 keep one source each
        for k in (9, 3):
            last.dbi.score_mlps[k][2].bias.fill_(-6.0)
    summed = same_weights(last, dbi_update="sum")
    a, b = last(frames()), summed(frames())
    for s, t in zip(a.streams, b.streams, strict=True):
        assert torch.equal(s.tokens, t.tokens) and torch.equal(s.rank_loss, t.rank_loss)
    assert torch.equal(a.dbi.pair_scores, b.dbi.pair_scores) and torch.equal(
        a.dbi.pair_passed, b.dbi.pair_passed
    )
    assert a.dbi.last_writer.tolist() == b.dbi.last_writer.tolist() == [3, 3, 1, 1]
    for j in (1, 3):  # one passing source of the other speed: both modes agree
        assert torch.equal(a.dbi.streams[j], b.dbi.streams[j])
    for j in (0, 2):  # two: "sum" adds the earlier source's contribution as well
        assert not torch.allclose(a.dbi.streams[j], b.dbi.streams[j])
    source = {0: 2, 2: 0}
    for j in (0, 2):
        extra = b.dbi.streams[j] - a.dbi.streams[j]
        i = source[j]
        contrib = last.dbi.contribution([s.tokens for s in a.streams], i, j)
        scores = last.dbi.score_mlps[4 * i + j](
            torch.cat([a.streams[i].tokens.mean(1), a.streams[j].tokens.mean(1)], -1)
        ).view(-1, 1, 1)
        torch.testing.assert_close(extra, scores * contrib, atol=1e-5, rtol=1e-4)


def test_dbi_off_changes_only_the_expert_inputs():
    on = make_head().train()
    off = same_weights(on, dbi=False)
    a, b = on(frames()), off(frames())
    assert b.dbi is None
    for s, t in zip(a.streams, b.streams, strict=True):
        assert torch.equal(s.tokens, t.tokens)
    for j in range(4):
        assert torch.equal(b.expert_outputs[j], off.experts[j](b.streams[j].tokens))
    assert not torch.allclose(a.logits, b.logits)
    # a threshold above 1 lets no pair pass: the same as DBI off (SPEC §1.4)
    closed = same_weights(on, dbi_threshold=1.01)(frames())
    assert not closed.dbi.pair_passed.any() and closed.dbi.last_writer.tolist() == [-1] * 4
    assert torch.equal(closed.logits, b.logits)


def test_diversity_option_changes_only_the_diversity_term():
    released = make_head().train()
    inter = same_weights(released, diversity="inter_expert")
    x, labels, text = frames(), torch.tensor([0, 1, 2]), torch.randn(5, D)
    a = released_loss(released(x), labels, text)
    b = released_loss(inter(x), labels, text)
    for name in ("ce", "gate", "text", "rank"):
        assert torch.equal(a.terms[name], b.terms[name]), name
    assert not torch.allclose(a.terms["diversity"], b.terms["diversity"])
    summaries = released(x).expert_summaries
    unit = torch.nn.functional.normalize(summaries, dim=-1)
    cos = unit @ unit.transpose(1, 2)
    off_diag = cos[:, ~torch.eye(4, dtype=torch.bool)]
    torch.testing.assert_close(b.terms["diversity"], (off_diag**2).mean())


def test_text_scale_changes_only_the_text_term():
    head = make_head().train()
    out = head(frames())
    labels, text = torch.tensor([0, 1, 2]), torch.randn(5, D)
    a = released_loss(out, labels, text)
    b = released_loss(out, labels, text, text_scale=10.0)
    assert {k for k in a.terms if not torch.equal(a.terms[k], b.terms[k])} == {"text"}


def test_released_loss_terms_and_coefficients():
    head = make_head().train()
    out = head(frames())
    labels, text = torch.tensor([0, 1, 2]), torch.randn(5, D)
    with_text = released_loss(out, labels, text)
    assert list(with_text.terms) == ["ce", "gate", "text", "diversity", "rank"]
    assert with_text.weights == {"ce": 1.0, "gate": 0.01, "text": 0.01, "diversity": 0.005, "rank": 0.1}
    expected = sum(with_text.weights[k] * v for k, v in with_text.terms.items())
    torch.testing.assert_close(with_text.total, expected)
    without = released_loss(out, labels)  # the VideoMAE recipe
    assert "text" not in without.terms
    torch.testing.assert_close(without.total, with_text.total - 0.01 * with_text.terms["text"])
    assert with_text.terms["rank"].item() > 0
    with pytest.raises(ValueError, match="unknown terms"):
        released_loss(out, labels, weights={"contrastive": 1.0})


def test_gates_sum_to_one_and_gate_loss_is_one_for_equal_mass():
    head = VidPrismHead(HeadConfig(dim=D, num_classes=5)).eval()
    out = head(frames())
    torch.testing.assert_close(out.gates.sum(-1), torch.ones(3))
    from prism_vfm.video.losses import gate_loss

    assert gate_loss(torch.full((3, 4), 0.25)).item() == pytest.approx(1.0)
    assert gate_loss(out.gates).item() > 1.0  # token counts 16/8/4/2 at init


def test_released_diversity_of_a_single_sample_is_zero():
    head = make_head().train()
    assert head(frames(batch=1)).aux_losses["diversity"].item() == 0.0


def test_training_and_eval_forward_agree_except_the_rank_loss():
    head = make_head()
    x = frames()
    train, evaluation = head.train()(x), head.eval()(x)
    torch.testing.assert_close(train.logits, evaluation.logits, atol=0, rtol=0)
    assert train.aux_losses["rank"].item() > 0 and evaluation.aux_losses["rank"].item() == 0


# --- errors


def test_clear_errors_on_bad_inputs():
    head = make_head()
    with pytest.raises(ValueError, match=r"\(B, T, 32\).*\(3, 32, 16\)"):
        head(torch.randn(3, 32, 16))
    with pytest.raises(ValueError, match=r"\(B, T, 32\)"):
        head(torch.randn(32, D))
    bad = frames()
    bad[1, 4, 7] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*\[1, 4, 7\]"):
        head(bad)
    text_head = make_head(variant="text")
    with pytest.raises(ValueError, match="needs class_text"):
        text_head(frames())
    with pytest.raises(ValueError, match=r"class_text must be \(C, 32\)"):
        text_head(frames(), torch.randn(5, 16))
    mae = make_head(variant="videomae")
    with pytest.raises(ValueError, match="no projection"):
        released_loss(mae(frames()), torch.tensor([0, 1, 2]), torch.randn(5, D))


def test_features_on_an_accelerator_are_read_back_only_when_asked():
    # A meta tensor stands for one on a GPU: reading its values raises, so the check must not read it.
    head = make_head()
    features = torch.empty(2, 8, D, device="meta")
    head._check(features, None)
    head.check_device_values = True
    with pytest.raises(RuntimeError):
        head._check(features, None)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"variant": "zeroshot"}, "variant='zeroshot'"),
        ({"dbi_update": "mean"}, "dbi_update='mean'"),
        ({"diversity": "cosine"}, "diversity='cosine'"),
        ({"rates": (2, 3, 8, 16)}, "multiple of every fast rate"),
        ({"rates": (4, 2, 8, 16)}, "ascending"),
        ({"rates": (2, 4, 8), "num_experts": 4}, "one expert per rate"),
        ({"dim": 30}, "multiple of num_heads"),
    ],
)
def test_config_errors_name_the_field(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        HeadConfig(**options)
