"""The whole VidPrism model: the head's share of a training step, and evaluation clips/s.

Builds ``VidPrism`` (CLIP ViT-B/16 frame encoder with random weights — speed does not depend on them —
and the released head, K400's 400 classes) and times, interleaved:

(1) ``head``: the head's own part of a step — forward + released loss + backward on the step's frame
    features (which take the gradient, as in the step) + the AdamW update of the head's parameters;
(2) ``step``: one whole training step as released — frame encoder on all B·T frames (activation
    checkpointing on, as the release has it; ``--no-checkpointing`` to turn it off), head, released loss
    (with the class text term), backward, AdamW over the two parameter groups (tower at lr × 0.07);
(3) ``eval``: the whole model's forward without gradients on the same clips.

head share = median(head) / median(step) (target <= 2 %); eval clips/s = B / median(eval).
Default: 8 frames of 224², B = 2. ``--quick``: a tiny tower and head (a smoke run, not a result).
GPU: ``python benchmarks/bench_vidprism_model.py --device cuda --dtype bf16`` (the same sizes; ``--batch``
/ ``--frames`` for the released 32-frame setting).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import harness
from prism_vfm.video import HeadConfig, VidPrism, released_loss
from prism_vfm.video.backbone import TowerConfig, tower_config

QUICK_TOWER = TowerConfig(patch_size=8, width=32, depth=2, heads=2, output_dim=16, img_size=32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_args(parser)
    parser.add_argument("--tower", default="ViT-B/16", help="ViT-B/16 (default) or ViT-L/14")
    parser.add_argument("--batch", type=int, default=2, help="clips per step (default 2)")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip (default 8)")
    parser.add_argument("--classes", type=int, default=400, help="classifier outputs (default 400)")
    parser.add_argument("--no-checkpointing", action="store_true", help="keep every block's activations")
    args = parser.parse_args(argv)
    if harness.in_processes(args, argv):
        return
    device = harness.setup(args)
    amp = harness.autocast(args, device)
    tower = QUICK_TOWER if args.quick else args.tower
    dim, side = tower_config(tower).output_dim, tower_config(tower).img_size
    head = HeadConfig(dim=dim, num_classes=args.classes)
    model = VidPrism(tower, head, grad_checkpointing=not args.no_checkpointing).to(device).train()
    optimizer = torch.optim.AdamW(model.param_groups(1e-4, 0.07), lr=1e-4, weight_decay=0.2)
    clips = torch.randn(args.batch, args.frames, 3, side, side, device=device)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    class_text = F.normalize(torch.randn(args.classes, dim, device=device), dim=-1)
    with torch.no_grad(), amp:
        features = model.backbone(clips).float()

    head_optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-4, weight_decay=0.2)

    def head_only() -> None:
        feats = features.detach().requires_grad_(True)
        with amp:
            loss = released_loss(model.head(feats), labels, class_text).total
        loss.backward()
        head_optimizer.step()
        head_optimizer.zero_grad(set_to_none=True)

    def run_step() -> None:
        with amp:
            loss = released_loss(model(clips), labels, class_text).total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def zero() -> None:
        model.zero_grad(set_to_none=True)

    harness.describe(args, device, memory=True)
    n_tower = sum(p.numel() for p in model.backbone.parameters())
    n_head = sum(p.numel() for p in model.head.parameters())
    print(
        f"model: {tower if isinstance(tower, str) else 'tiny tower'} ({n_tower / 1e6:.2f}M) + head "
        f"({n_head / 1e6:.2f}M, D {dim}, {args.classes} classes), random weights; clips {args.batch} x "
        f"{args.frames} frames of {side}x{side}; activation checkpointing "
        f"{'off' if args.no_checkpointing else 'on'}"
    )
    cases = [
        harness.Case("head (fwd + loss + bwd + AdamW)", head_only, zero),
        harness.Case("step (whole model + AdamW)", run_step, zero),
        harness.Case("eval (whole model, no grad)", harness.inference_call(lambda: model(clips), amp)),
    ]
    results = harness.run_interleaved(cases, args.repeats, args.warmup, device)
    harness.measure_memory(cases, results, device)
    harness.report("VidPrism: head alone, whole training step, whole-model evaluation", results)
    head, step, ev = (results[c.name] for c in cases)
    harness.ratio("head share of the training step (head / step)", head, step, target=0.02)
    print(
        f"eval throughput: {args.batch / ev.median:.2f} clips/s ({args.batch * args.frames / ev.median:.1f} "
        f"frames/s; median {ev.median * 1e3:.1f} ms per {args.batch} clips)"
    )
    print(f"train throughput: {args.batch / step.median:.2f} clips/s")
    harness.finish()


if __name__ == "__main__":
    main()
