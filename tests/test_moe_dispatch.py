"""Expert dispatch: every backend computes the dual-weighted top-k mixture exactly, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prism_vfm.layers.experts import GroupedExperts, grouped_mm_supported, sort_by_expert
from prism_vfm.layers.moe import ConditionedMoE, MoEConfig

BACKENDS = ["loop", "padded", "grouped"]


def naive_mixture(u, experts: GroupedExperts, indices, weights, double: bool):
    """Independent oracle: every token, every slot, its expert's MLP, written out with Python loops."""
    out = torch.zeros_like(u)
    for t in range(u.shape[0]):
        for j in range(indices.shape[1]):
            e, w = int(indices[t, j]), weights[t, j]
            x = u[t] * w if double else u[t]
            h = F.gelu(x @ experts.w1[e] + experts.b1[e])
            out[t] = out[t] + w * (h @ experts.w2[e] + experts.b2[e])
    return out


def make_moe(backend: str, double: bool = True, dim: int = 32, experts: int = 5, k: int = 2):
    torch.manual_seed(0)
    moe = ConditionedMoE(
        dim,
        MoEConfig(
            num_experts=experts, top_k=k, double_weighting=double, backend=backend, expert_mlp_ratio=2.0
        ),
    )
    with torch.no_grad():  # distinct experts, so a mix-up between them cannot go unnoticed
        for p in moe.experts.parameters():
            p.normal_(0, 0.2)
    return moe


def routing(tokens: int, experts: int, k: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g)
    values, indices = logits.topk(k, dim=-1)
    return indices, values.softmax(-1)


def _skip_unsupported(backend, moe, u):
    if backend == "grouped" and not grouped_mm_supported(u, moe.experts.w1):
        pytest.skip("torch.nn.functional.grouped_mm is not available for these tensors in this PyTorch build")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("double", [True, False])
def test_backends_match_naive_oracle_forward_and_backward(backend, double):
    moe = make_moe(backend, double)
    u = torch.randn(23, 32, requires_grad=True)
    _skip_unsupported(backend, moe, u)
    indices, weights = routing(23, 5, 2)
    weights.requires_grad_(True)
    got = moe.routed(u, indices, weights)
    grads = torch.autograd.grad(got.square().sum(), [u, weights, *moe.experts.parameters()])
    ref = naive_mixture(u, moe.experts, indices, weights, double)
    ref_grads = torch.autograd.grad(ref.square().sum(), [u, weights, *moe.experts.parameters()])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_double_weighting_differs_from_single_weighting():
    u = torch.randn(11, 32)
    indices, weights = routing(11, 5, 2)
    double = make_moe("loop", True).routed(u, indices, weights)
    single = make_moe("loop", False).routed(u, indices, weights)
    assert (double - single).abs().max() > 1e-3


def test_unused_experts_still_receive_zero_gradients():
    # DDP without find_unused_parameters needs a gradient for every parameter on every step.
    for backend in ("loop", "padded"):
        moe = make_moe(backend)
        u = torch.randn(4, 32)
        indices = torch.tensor([[0, 1]] * 4)  # experts 2..4 get no token
        weights = torch.full((4, 2), 0.5)
        moe.routed(u, indices, weights).sum().backward()
        for p in moe.experts.parameters():
            assert p.grad is not None
            assert torch.all(p.grad[2:] == 0)


def test_sort_by_expert_is_a_stable_grouping():
    indices = torch.tensor([[2, 0], [0, 1], [2, 1]])
    order, expert_ids, counts = sort_by_expert(indices, 4)
    assert counts.tolist() == [2, 2, 2, 0]
    assert expert_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert order.tolist() == [1, 2, 3, 5, 0, 4]


def test_experts_start_as_copies_of_the_dense_mlp():
    from timm.layers import Mlp

    mlp = Mlp(32, 64)
    moe = ConditionedMoE(32, MoEConfig(num_experts=3, top_k=2, expert_mlp_ratio=2.0))
    moe.init_from_mlp(mlp)
    u = torch.randn(7, 32)
    for e in range(3):
        y = F.gelu(u @ moe.experts.w1[e] + moe.experts.b1[e]) @ moe.experts.w2[e] + moe.experts.b2[e]
        torch.testing.assert_close(y, mlp(u))
    torch.testing.assert_close(moe.shared(u), mlp(u))


def test_random_expert_init_leaves_the_experts_different_from_the_dense_mlp_and_each_other():
    from timm.models.vision_transformer import Block

    from prism_vfm.layers.dual_stream import DualStreamBlock

    u = torch.randn(7, 32)
    for init, copies in (("copy", True), ("random", False)):
        block = Block(32, 2)
        cfg = MoEConfig(num_experts=3, top_k=2, expert_mlp_ratio=4.0, expert_init=init)
        moe = DualStreamBlock(block, cfg).moe
        outs = [
            F.gelu(u @ moe.experts.w1[e] + moe.experts.b1[e]) @ moe.experts.w2[e] + moe.experts.b2[e]
            for e in range(3)
        ]
        assert torch.allclose(outs[0], block.mlp(u), atol=1e-5) is copies
        assert torch.allclose(outs[0], outs[1], atol=1e-5) is copies
        assert torch.allclose(moe.shared(u), block.mlp(u), atol=1e-5) is copies
    with pytest.raises(ValueError, match="expert_init"):
        ConditionedMoE(32, MoEConfig(expert_init="zeros"))


def test_no_token_is_dropped_under_heavy_imbalance():
    moe = make_moe("loop", double=False)
    u = torch.randn(50, 32)
    indices = torch.zeros(50, 2, dtype=torch.long)
    indices[:, 1] = 1  # every token to experts 0 and 1
    weights = torch.full((50, 2), 0.5)
    got = moe.routed(u, indices, weights)
    torch.testing.assert_close(
        got, naive_mixture(u, moe.experts, indices, weights, False), atol=1e-5, rtol=1e-5
    )


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: the grouped_mm bf16 kernel and the "
    "sync-free default path exist only there; the CPU backends above are tested here",
)
def test_cuda_default_backend_matches_loop_in_bf16():
    moe = make_moe("auto").cuda()
    ref = make_moe("loop").cuda()
    ref.load_state_dict(moe.state_dict())
    u = torch.randn(257, 32, device="cuda")
    indices, weights = routing(257, 5, 2)
    indices, weights = indices.cuda(), weights.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = moe.routed(u, indices, weights)
        want = ref.routed(u, indices, weights)
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


def _expert_step(moe: ConditionedMoE, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(19, 32, generator=g)
    indices, weights = routing(19, 5, 2, seed=seed)
    (moe.routed(u, indices, weights) * torch.randn(19, 32, generator=g)).sum().backward()


def test_gradient_memory_is_off_by_default_and_keeps_nothing():
    moe = make_moe("loop")
    assert moe.experts.keep_grad_memory is False
    _expert_step(moe, 1)
    moe.zero_grad(set_to_none=True)
    _expert_step(moe, 2)
    assert moe.experts.grad_memory._storages == {}


def test_keep_grad_memory_opts_every_expert_layer_in_and_out():
    from prism_vfm.layers.experts import keep_grad_memory

    model = torch.nn.ModuleList([make_moe("loop"), make_moe("loop")])
    keep_grad_memory(model)
    assert all(m.experts.keep_grad_memory for m in model)
    _expert_step(model[0], 1)
    assert set(model[0].experts.grad_memory._storages) == {"w1", "w2"}
    keep_grad_memory(model, enabled=False)
    assert not any(m.experts.keep_grad_memory for m in model)
    assert model[0].experts.grad_memory._storages == {}


def test_gradient_memory_is_reused_only_when_nobody_holds_it():
    moe = make_moe("loop")
    moe.experts.keep_grad_memory = True  # opt-in
    experts = moe.experts
    _expert_step(moe, 1)
    first_ptr = experts.w1.grad.data_ptr()
    first = experts.w1.grad.clone()

    # The previous gradient is still .grad: the next backward must accumulate into it from new memory.
    _expert_step(moe, 2)
    assert experts.w1.grad.data_ptr() == first_ptr
    moe_ref = make_moe("loop")  # fresh memory every backward (the default)
    _expert_step(moe_ref, 1)
    _expert_step(moe_ref, 2)
    torch.testing.assert_close(experts.w1.grad, moe_ref.experts.w1.grad)

    # Someone keeps the gradient past zero_grad: it must survive the next backward untouched.
    held = experts.w2.grad
    held_values = held.clone()
    moe.zero_grad(set_to_none=True)
    _expert_step(moe, 3)
    assert experts.w2.grad.data_ptr() != held.data_ptr()
    torch.testing.assert_close(held, held_values)

    # Nobody holds it any more: the memory kept from last time is handed out again.
    kept_ptr = experts.w1.grad.data_ptr()
    moe.zero_grad(set_to_none=True)
    _expert_step(moe, 4)
    assert experts.w1.grad.data_ptr() == kept_ptr == experts.grad_memory._storages["w1"].data_ptr()
    moe_ref.zero_grad(set_to_none=True)
    _expert_step(moe_ref, 4)
    for name in ("w1", "b1", "w2", "b2"):
        torch.testing.assert_close(getattr(experts, name).grad, getattr(moe_ref.experts, name).grad)
    assert not torch.equal(experts.w1.grad, first)


def test_gradient_memory_is_not_shared_by_copies_and_autograd_grad_results_stay_intact():
    import copy

    moe = make_moe("loop")
    moe.experts.keep_grad_memory = True
    twin = copy.deepcopy(moe)
    _expert_step(moe, 1)
    _expert_step(twin, 1)
    assert moe.experts.w1.grad.data_ptr() != twin.experts.w1.grad.data_ptr()

    u = torch.randn(19, 32)
    indices, weights = routing(19, 5, 2)
    w1 = moe.experts.w1
    grads = [torch.autograd.grad(moe.routed(u * s, indices, weights).sum(), w1)[0] for s in (1.0, 2.0)]
    assert grads[0].data_ptr() != grads[1].data_ptr()
    assert not torch.allclose(grads[0], grads[1])
    torch.testing.assert_close(grads[0], torch.autograd.grad(moe.routed(u, indices, weights).sum(), w1)[0])
