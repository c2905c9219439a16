"""Cost of one dual-stream FFN against a plain ViT MLP and against its own FLOP-matched dense floor.

Times, on the (B, N, D) tokens of one block (default ViT-B/16 at 224: 8 × 197 × 768):

(a) a plain timm ``Mlp(D, 4D)``;
(b) the FFN part of a ``DualStreamBlock`` — everything after the attention residual: λ gate, anchor,
    router, routed experts, shared expert and the λ mix — by calling the block's own submodules, once
    per dispatch backend;
(c) the dense floor with the same matrix products and no dispatch: anchor + shared + ``top_k`` more
    MLPs over all tokens, plus the router's per-token linear layers (input gate D→D, gate D→E and, in
    training, noise D→E);
(d) a diagnostic second floor: (c) with its ``top_k`` MLPs replaced by the routed experts alone — a
    ``GroupedExperts`` on the default backend, each expert on its own segment of an already sorted and
    gathered (tokens × top_k, D) buffer, segment sizes from a routing of the same tokens — so the same
    expert work as (b) without the router's decisions, sort, gather, weighting or slot sum.

Training: forward and backward (the aux loss included in (b)); eval: forward only under no_grad.
``(b)/(c)`` is the price of routing and dispatch; ``(b)/(a)`` what a dual-stream FFN costs relative to
the FFN it replaces. ``(d)`` splits ``(b)/(c)`` in two: ``(d)/(c)`` is what running ``num_experts`` small
experts costs over ``top_k`` large MLPs with the same FLOPs (each expert's weights are read, and its
weight gradients written, for a fifth of the rows), ``(b)/(d)`` what the dispatch itself adds. Run
``python benchmarks/bench_dual_stream.py --help`` for the options.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

import harness
from prism_vfm.layers.dual_stream import DualStreamBlock
from prism_vfm.layers.experts import (
    BACKENDS,
    GroupedExperts,
    default_backend,
    grouped_mm_supported,
    sort_by_expert,
)
from prism_vfm.layers.moe import MoEConfig

TARGET_VS_MLP = 5.4
TARGET_VS_FLOOR = 1.03


class DenseFloor(nn.Module):
    """The dual-stream FFN's matrix products with no routing: every MLP and router layer on every token."""

    def __init__(self, dim: int, hidden: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.mlps = nn.ModuleList(Mlp(dim, hidden) for _ in range(2 + cfg.top_k))
        self.input_gate = nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, cfg.num_experts)
        self.noise = nn.Linear(dim, cfg.num_experts) if cfg.noisy_gating else None

    def forward(self, u: Tensor) -> list[Tensor]:
        y = self.mlps[0](u)
        for mlp in self.mlps[1:]:
            y = y + mlp(u)
        outs = [y, self.input_gate(u), self.gate(u)]
        # As in the router, the noise layer runs only in training.
        if self.training and self.noise is not None:
            outs.append(self.noise(u))
        return outs


class ExpertFloor(nn.Module):
    """(d): :class:`DenseFloor` with its ``top_k`` MLPs replaced by the routed experts on pre-sorted rows."""

    def __init__(self, dim: int, hidden: int, cfg: MoEConfig, counts: Tensor) -> None:
        super().__init__()
        self.dense = DenseFloor(dim, hidden, replace(cfg, top_k=0))
        self.experts = GroupedExperts(cfg.num_experts, dim, hidden, backend=cfg.backend)
        self.register_buffer("counts", counts)
        self.register_buffer("expert_ids", torch.repeat_interleave(torch.arange(len(counts)), counts.cpu()))

    def forward(self, u: Tensor, rows: Tensor) -> list[Tensor]:
        """``u`` (B, N, D) the tokens; ``rows`` (sum(counts), D) the expert inputs, sorted by expert."""
        return [*self.dense(u), self.experts(rows, self.expert_ids, self.counts)]


def dual_stream_ffn(block: DualStreamBlock, u: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
    """``DualStreamBlock.forward`` after the attention residual (and without adding it back)."""
    lam = block.mixing_weight(u)
    moe_out, _, aux = block.moe(u, cond)
    return torch.lerp(moe_out, block.anchor(u), lam), aux


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_args(parser)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--tokens", type=int, default=197, help="tokens per image, CLS included (224/16: 197)"
    )
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--backends", default="loop,padded,grouped", help="comma-separated dispatch backends")
    parser.add_argument("--modes", default="train,eval", help="comma-separated: train (fwd+bwd), eval (fwd)")
    parser.add_argument(
        "--kept-grad-memory",
        action="store_true",
        help="also time the loop backend with keep_grad_memory=True (the opt-in GradMemory: weight-gradient "
        "memory kept between backward passes)",
    )
    args = parser.parse_args(argv)
    if harness.in_processes(args, argv):
        return
    if args.quick:
        args.batch, args.tokens, args.dim = 2, 17, 64
    device = harness.setup(args)
    amp = harness.autocast(args, device)
    cfg = MoEConfig()
    dim, hidden = args.dim, int(args.dim * cfg.expert_mlp_ratio)

    u = torch.randn(args.batch, args.tokens, dim, device=device, requires_grad=True)
    cond = torch.randn(args.batch, dim, device=device, requires_grad=True)
    grad_u = torch.randn_like(u)
    mlp = Mlp(dim, hidden).to(device)
    floor = DenseFloor(dim, hidden, cfg).to(device)
    floor_grads = [torch.randn_like(y) for y in floor(u)]
    with amp:
        auto = default_backend(u, torch.empty(cfg.num_experts, dim, hidden, device=device))
    blocks = build_blocks(args.backends.split(","), auto, dim, cfg, u, amp, device)
    if args.kept_grad_memory:
        kept = build_blocks(["loop"], "loop", dim, cfg, u, amp, device)["loop"]
        kept.moe.experts.keep_grad_memory = True
        blocks[KEPT] = kept
    loop_block = blocks.get("loop", blocks[auto])
    with amp:
        counts = sort_by_expert(loop_block.moe.router(u, cond).indices, cfg.num_experts)[2]
    rows = torch.randn(int(counts.sum()), dim, device=device, requires_grad=True)
    expert_floor = ExpertFloor(dim, hidden, replace(cfg, backend=auto), counts).to(device)
    expert_floor_grads = [torch.randn_like(y) for y in expert_floor(u, rows)]
    modules = (mlp, floor, expert_floor, *blocks.values())
    leaves = [u, cond, rows, *(p for m in modules for p in m.parameters())]

    def zero_grads() -> None:
        for t in leaves:
            t.grad = None

    def train(fn: Callable[[], list[Tensor]], grads: list[Tensor]) -> Callable[[], None]:
        def run() -> None:
            with amp:
                outs = fn()
            torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads, strict=True)])

        return run

    def ffn(block: DualStreamBlock) -> Callable[[], list[Tensor]]:
        return lambda: list(dual_stream_ffn(block, u, cond))

    ffn_grads = [grad_u, torch.ones((), device=device)]
    harness.describe(args, device, memory=device.type == "cuda")
    print(
        f"sizes: batch {args.batch}, tokens {args.tokens}, width {dim}, hidden {hidden}; "
        f"{cfg.num_experts} experts top-{cfg.top_k} + shared; auto dispatch resolves to {auto!r}"
    )
    print(
        "(a) timm Mlp; (b) dual-stream FFN (λ gate, anchor, router, experts, shared, λ mix), per backend; "
        f"(c) dense floor: anchor + shared + {cfg.top_k} MLPs + the router's input gate, gate and (train) "
        "noise layers, all on every token; (d) expert floor: (c) with its MLPs replaced by the routed "
        f"experts ({auto} backend) on pre-sorted rows (segments of {int(counts.min())}–"
        f"{int(counts.max())} rows, {int(counts.sum())} in all)"
    )
    for mode in args.modes.split(","):
        for m in modules:
            m.train(mode == "train")
        wrap = train if mode == "train" else (lambda fn, _grads: harness.inference_call(fn, amp))
        run_a = wrap(lambda: [mlp(u)], [grad_u])
        run_c = wrap(lambda: floor(u), floor_grads)
        run_d = wrap(lambda: expert_floor(u, rows), expert_floor_grads)
        cases = [
            harness.Case("(a) timm Mlp", run_a, zero_grads),
            harness.Case("(c) dense floor", run_c, zero_grads),
            harness.Case("(d) expert floor", run_d, zero_grads),
        ]
        cases += [
            harness.Case(ffn_name(b), wrap(ffn(blk), ffn_grads), zero_grads) for b, blk in blocks.items()
        ]
        flops = {
            k: harness.count_flops(fn)
            for k, fn in (("a", run_a), ("b", wrap(ffn(loop_block), ffn_grads)), ("c", run_c), ("d", run_d))
        }
        results = harness.run_interleaved(cases, args.repeats, args.warmup, device)
        if device.type == "cuda":
            harness.measure_memory(cases, results, device, [expert_floor, *blocks.values()])
        what = "forward + backward, train mode" if mode == "train" else "forward only, eval mode, no_grad"
        harness.report(f"{mode}: {what}", results)
        a, c, d = results["(a) timm Mlp"], results["(c) dense floor"], results["(d) expert floor"]
        for b in blocks:
            main_row = mode == "train" and b == auto
            res = results[ffn_name(b)]
            tag = f"{mode} [{b}{', auto' if b == auto else ''}]"
            harness.ratio(
                f"{tag} (b)/(a) FFN vs timm Mlp",
                res,
                a,
                TARGET_VS_MLP if main_row and not args.quick else None,
                flops["b"] / flops["a"],
            )
            harness.ratio(
                f"{tag} (b)/(c) dispatch overhead",
                res,
                c,
                TARGET_VS_FLOOR if main_row and not args.quick else None,
                flops["b"] / flops["c"],
            )
            harness.ratio(
                f"{tag} (b)/(d) dispatch over the expert floor", res, d, None, flops["b"] / flops["d"]
            )
        harness.ratio(f"{mode} (c)/(a) floor vs timm Mlp", c, a, None, flops["c"] / flops["a"])
        harness.ratio(f"{mode} (d)/(c) separate experts vs the floor", d, c, None, flops["d"] / flops["c"])
    print("\nFLOP ratio: matrix-product FLOPs counted by torch.utils.flop_counter (loop backend for (b)).")
    harness.finish()


KEPT = "loop, kept gradient memory"


def ffn_name(backend: str) -> str:
    return f"(b) dual-stream FFN [{backend}]"


def build_blocks(
    names: list[str],
    auto: str,
    dim: int,
    cfg: MoEConfig,
    u: Tensor,
    amp: AbstractContextManager,
    device: torch.device,
) -> dict[str, DualStreamBlock]:
    """One block per requested backend (and the auto one), all with the same weights."""
    blocks: dict[str, DualStreamBlock] = {}
    for name in dict.fromkeys([*(n for n in names if n), auto]):
        if name not in BACKENDS or name == "auto":
            raise SystemExit(f"unknown backend {name!r}; choose from loop, padded, grouped")
        torch.manual_seed(0)
        block = DualStreamBlock(Block(dim, max(1, dim // 64), qkv_bias=True), replace(cfg, backend=name)).to(
            device
        )
        with amp:
            usable = name != "grouped" or grouped_mm_supported(u, block.moe.experts.w1)
        if usable:
            blocks[name] = block
        else:
            print(
                "note: backend grouped skipped: torch.nn.functional.grouped_mm does not run for these "
                "tensors here"
            )
    return blocks


if __name__ == "__main__":
    main()
