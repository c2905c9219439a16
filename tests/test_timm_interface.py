"""timm's interface on the student: forward_features / forward_intermediates / features_only with the context
as an argument, a structured output, routing returned (never stored), activation checkpointing and
torch.compile."""

from __future__ import annotations

import pytest
import timm
import torch

from prism_vfm import MultiTaskOutput, PrismMultiTask, PrismOutput
from prism_vfm.data.registry import dataset_tasks
from tests.tiny import TINY, tiny_student


def _ids(*ids):
    return torch.tensor(ids, dtype=torch.long)


def _routed(model):
    """FiLM starts at zero (every context routes alike): give it weight so that contexts matter."""
    with torch.no_grad():
        for block in model.dual_stream_blocks:
            block.moe.router.film.weight.normal_(0, 1.0)
    return model


def test_forward_intermediates_are_the_taps_in_timm_s_formats():
    torch.manual_seed(0)
    model = _routed(tiny_student()).eval()
    x, ids = torch.randn(2, 3, 32, 32), _ids(0, 2)
    taps = model(x, ids).taps
    # NLC with the final norm and the prefix tokens split off: exactly PRISM's taps.
    feats = model.forward_intermediates(
        x,
        indices=[1, 3],
        norm=True,
        output_fmt="NLC",
        intermediates_only=True,
        return_prefix_tokens=True,
        context=ids,
    )
    for (patches, prefix), tap in zip(feats, taps, strict=True):
        torch.testing.assert_close(patches, tap[:, 1:], rtol=0, atol=0)
        torch.testing.assert_close(prefix, tap[:, :1], rtol=0, atol=0)
    # NCHW maps of every block (indices=None), and the final normed tokens of forward_features.
    final, maps = model.forward_intermediates(x, norm=True, context=ids)
    assert [m.shape for m in maps] == [(2, 32, 4, 4)] * 4
    torch.testing.assert_close(maps[3], model.to_maps(taps[1], (4, 4)), rtol=0, atol=0)
    torch.testing.assert_close(final, model.forward_features(x, ids), rtol=0, atol=0)
    # The last tap is the last block here, so forward_features ends where the taps end.
    torch.testing.assert_close(final, taps[-1], rtol=0, atol=0)
    assert model.forward_head(final, pre_logits=True).shape == (2, 32)  # the class token
    # indices=1 is the last block, as in timm; the dictionary form carries the same tensors.
    last = model.forward_intermediates(x, indices=1, intermediates_only=True, context=ids)
    as_dict = model.forward_intermediates(x, indices=1, output_dict=True, context=ids)
    torch.testing.assert_close(as_dict["image_intermediates"][0], last[0], rtol=0, atol=0)
    torch.testing.assert_close(as_dict["image_features"], final, rtol=0, atol=0)
    # The context is an argument that matters, and get_intermediate_layers passes it too.
    other = model.forward_intermediates(x, indices=1, intermediates_only=True, context=_ids(1, 1))
    assert not torch.allclose(other[0], last[0])
    dino = model.get_intermediate_layers(x, n=1, reshape=True, context=ids)
    torch.testing.assert_close(dino[0], last[0], rtol=0, atol=0)


def test_a_context_routed_model_asks_for_its_context():
    model = tiny_student()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="routes by context"):
        model.forward_features(x)
    with pytest.raises(ValueError, match="routes by context"):
        model.forward_intermediates(x)
    # A context-free router does not: its output is the same under every id.
    free = tiny_student(conditioning="none").eval()
    torch.testing.assert_close(free.forward_features(x), free.forward_features(x, 2), rtol=0, atol=0)


def test_features_only_through_timm_create_model():
    kwargs = dict(img_size=32, depth=4, moe_layers=(1, 3), num_experts=4, top_k=2, teacher_dims=(8, 8, 8))
    torch.manual_seed(0)
    full = _routed(timm.create_model("prism_vit_tiny_patch16_384", **kwargs)).eval()
    feats = timm.create_model("prism_vit_tiny_patch16_384", features_only=True, **kwargs)
    assert feats.feature_info.channels() == [192, 192] and feats.feature_info.reduction() == [16, 16]
    assert feats.feature_info.module_name() == ["blocks.1", "blocks.3"]  # the feature taps by default
    assert feats.model.projectors is None  # the distillation heads are not part of a backbone
    result = feats.model.load_state_dict(full.state_dict(), strict=False)
    assert not result.missing_keys and all(
        k.startswith(("projectors.", "norm.")) for k in result.unexpected_keys
    )
    x, ids = torch.randn(2, 3, 32, 32), _ids(2, 0)
    expected = full.forward_intermediates(x, indices=[1, 3], intermediates_only=True, context=ids)
    for got, want in zip(feats.eval()(x, ids), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Fewer blocks: the ones after the last index are dropped; a context at creation serves every call.
    early = timm.create_model(
        "prism_vit_tiny_patch16_384",
        features_only=True,
        out_indices=(0, 1),
        feature_cfg={"context": 1},
        **kwargs,
    )
    assert len(early.model.blocks) == 2 and early.model.moe_layers == (1,)
    early.model.load_state_dict(full.state_dict(), strict=False)
    early.eval()
    torch.testing.assert_close(early(x)[1], early(x, _ids(1, 1))[1], rtol=0, atol=0)
    torch.testing.assert_close(
        early(x)[1], full.forward_intermediates(x, indices=[1], intermediates_only=True, context=1)[0]
    )


def test_forward_returns_a_structured_output_and_routing_only_when_asked():
    model = _routed(tiny_student()).eval()
    x = torch.randn(3, 3, 32, 32)
    plain = model(x, [0, 2, 1])  # a host sequence of ids is accepted
    assert isinstance(plain, PrismOutput) and plain.routing is None
    assert plain.kind == "teacher" and plain.context.tolist() == [0, 2, 1]
    out = model(x, _ids(0, 2, 1), return_routing=True)
    assert list(out.routing) == [1, 3]
    for tap, ref in zip(out.taps, plain.taps, strict=True):
        torch.testing.assert_close(tap, ref, rtol=0, atol=0)
    routing = out.routing[3]
    assert routing.logits.shape == (3, 17, 5) and routing.indices.shape == routing.weights.shape == (3, 17, 2)
    assert routing.lam.shape == (3, 17, 1)
    assert torch.equal(routing.indices, routing.logits.topk(2, dim=-1).indices)
    with pytest.raises(ValueError, match="return_routing=True"):
        model.routing_stats(plain)


def test_a_forward_leaves_every_module_as_it_was():
    # Routing is returned, never written to the modules: recomputation (checkpointing) and torch.compile
    # depend on a forward without side effects.
    model = tiny_student().train()

    def state():
        return {name: dict(vars(m)) for name, m in model.named_modules()}

    before = state()
    model(torch.randn(2, 3, 32, 32), _ids(0, 1), return_routing=True)
    model.forward_passes(
        torch.randn(2, 3, 32, 32), [("teacher", 0), ("teacher", _ids(1, 2))], return_routing=True
    )
    after = state()
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys(), name
        changed = [k for k in before[name] if before[name][k] is not after[name][k]]
        assert not changed, (name, changed)


def _grads(model, loss_fn, checkpointing):
    model.set_grad_checkpointing(checkpointing)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # expert dropout and router noise draw the same numbers in both runs
    loss_fn().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_recomputes_the_blocks_and_gives_the_same_gradients():
    torch.manual_seed(0)
    model = _routed(tiny_student()).train()  # training mode: expert dropout and noisy gating are on
    x, ids = torch.randn(3, 3, 32, 32), _ids(0, 1, 2)
    calls = []
    hooks = [model.blocks[i].register_forward_pre_hook(lambda *_, i=i: calls.append(i)) for i in (0, 3)]

    def distill():
        out = model(x, ids)
        maps = model.project_by_teacher(out.taps, ids, model.grid_size(x))
        return out.aux_loss + sum(m.square().mean() for per_tap in maps.values() for m in per_tap)

    def passes():
        out = model.forward_passes(x, [("teacher", ids), ("teacher", 1)])
        return out.aux_loss.sum() + sum(t.square().mean() for t in out.taps)

    for loss_fn in (distill, passes):
        calls.clear()
        plain = _grads(model, loss_fn, False)
        assert calls == [0, 3]
        calls.clear()
        checkpointed = _grads(model, loss_fn, True)
        assert sorted(calls) == [0, 0, 3, 3]  # each block ran again in the backward pass
        assert plain.keys() == checkpointed.keys()
        for name in plain:
            torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0, msg=name)
    for hook in hooks:
        hook.remove()
    # No gradients, nothing to recompute: inference is unaffected.
    with torch.no_grad():
        model.eval()(x, ids)


def test_multitask_output_and_checkpointing():
    torch.manual_seed(0)
    model = PrismMultiTask(dict(TINY), dataset_tasks("pascalcontext"))
    _routed(model.student)
    x = torch.randn(2, 3, 32, 32)
    out = model.eval()(x, return_routing=True)
    assert isinstance(out, MultiTaskOutput) and out.taps is None and out.routing is not None
    assert list(out.predictions) == model.task_names
    for task in ("semseg", "edge"):
        ref = model.student(x, model.task_id(task), kind="task", return_routing=True)
        assert list(out.routing[task]) == list(ref.routing) == [1, 3]
        for layer, routing in ref.routing.items():
            assert torch.equal(out.routing[task][layer].indices, routing.indices)
            torch.testing.assert_close(out.routing[task][layer].lam, routing.lam)
    model.train()

    def loss():
        result = model(x)
        return result.aux_loss + sum(p.square().mean() for p in result.predictions.values())

    plain = _grads(model, loss, False)
    checkpointed = _grads(model, loss, True)
    assert model.student.grad_checkpointing
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0, msg=name)


def test_context_ids_on_the_host_are_checked_before_the_transfer():
    model = tiny_student()
    x = torch.randn(2, 3, 32, 32)
    for bad in ([0, 3], _ids(0, 3), 3, -1):
        with pytest.raises(ValueError, match=r"teacher context ids must be in \[0, 3\)"):
            model(x, bad)
    with pytest.raises(ValueError, match="an int, a sequence of ints"):
        model(x, ["a", "b"])
    # Ids already on another device are not read back (a read of a meta tensor's values raises), unless
    # the model is asked to check them.
    on_device = torch.tensor([0, 7], device="meta")
    moved = model._context_ids(on_device, 2, "teacher", torch.device("meta"))
    assert moved.device.type == "meta" and moved.dtype == torch.long
    model.check_device_ids = True
    with pytest.raises((RuntimeError, NotImplementedError)):
        model._context_ids(on_device, 2, "teacher", torch.device("meta"))


def test_torch_compile_gives_the_eager_results():
    # "aot_eager" traces the forward and backward graphs as inductor would receive them (dynamo and
    # AOTAutograd) without generating code: inductor's C++ builds take minutes on a CPU, and its own
    # random numbers would make training-mode routing differ from the eager run.
    torch.manual_seed(0)
    model = _routed(tiny_student(depth=2, moe_layers=(1,), tap_layers=(0, 1))).train()
    x, ids = torch.randn(2, 3, 32, 32), _ids(0, 2)

    def run(fn):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        out = fn(x, ids, return_routing=True)
        (sum(t.square().mean() for t in out.taps) + out.aux_loss).backward()
        return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    eager, eager_grads = run(model)
    compiled, compiled_grads = run(torch.compile(model, backend="aot_eager"))
    assert isinstance(compiled, PrismOutput) and list(compiled.routing) == [1]
    torch.testing.assert_close(compiled.taps, eager.taps)
    torch.testing.assert_close(compiled.aux_loss, eager.aux_loss)
    assert torch.equal(compiled.routing[1].indices, eager.routing[1].indices)
    assert compiled_grads.keys() == eager_grads.keys()
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], msg=name)


def test_batched_passes_run_no_dual_stream_block_after_the_last_tap():
    # Block 3 is a dual-stream block after the last tap (1): like the forward, the batched passes skip it.
    model = tiny_student(moe_layers=(3,), tap_layers=(0, 1)).train()
    x = torch.randn(2, 3, 32, 32)
    out = model.forward_passes(x, [("teacher", 0), ("teacher", _ids(1, 2))], return_routing=True)
    assert out.routing == {} and out.aux_loss.tolist() == [0.0, 0.0]
    for i, ctx in enumerate((0, _ids(1, 2))):
        single = model(x, ctx, return_routing=True)
        assert single.routing == {} and float(single.aux_loss) == 0.0
        for tap, ref in zip(out.taps, single.taps, strict=True):
            torch.testing.assert_close(tap[2 * i : 2 * i + 2], ref)
