"""Whole-model cost of the PRISM student against the dense ViT it grows from.

Times one training step — forward and backward of ``model(x, teacher_ids)`` with
loss = Σ tap means + aux — of the Stage-1 student (ViT-B/16 at 224, dual-stream blocks 2/5/8/11,
three ViT-L-sized teachers, teachers mixed within the batch), once without and once with the
projector heads applied to every sample for its own teacher (``project_by_teacher``, as Stage 1
does), against ``forward_features`` + backward of a dense timm ``vit_base_patch16_224``; the Stage-1
step once more with activation checkpointing (``set_grad_checkpointing``: its time and peak memory
against the plain step); and the eval-mode forward of both. Run ``python benchmarks/bench_student.py
--help`` for the options.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

import harness
from prism_vfm.models.prism_vit import PrismViT

TARGET_TRAIN = 1.8

# The Stage-1 step (projectors on) with activation checkpointing of every block.
CHECKPOINTED = "student + projectors, checkpointed"

QUICK = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)


def build(args: argparse.Namespace, device: torch.device) -> tuple[PrismViT, VisionTransformer]:
    """The student and the dense baseline, same backbone sizes."""
    if args.quick:
        student = PrismViT(**QUICK, moe_layers=(1, 3), teacher_dims=(16, 24, 16), dispatch=args.dispatch)
        dense = VisionTransformer(**QUICK, num_classes=0)
    else:
        student = PrismViT(img_size=args.img_size, dispatch=args.dispatch)
        dense = timm.create_model(
            "vit_base_patch16_224", pretrained=False, num_classes=0, img_size=args.img_size
        )
    return student.to(device), dense.to(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_args(parser)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument(
        "--dispatch", default="auto", help="expert dispatch backend of the student (default auto)"
    )
    parser.add_argument("--modes", default="train,eval", help="comma-separated: train (fwd+bwd), eval (fwd)")
    parser.set_defaults(repeats=5)
    args = parser.parse_args(argv)
    if harness.in_processes(args, argv):
        return
    if args.quick:
        args.batch = 3
    device = harness.setup(args)
    amp = harness.autocast(args, device)
    student, dense = build(args, device)
    size = student.patch_embed.img_size
    x = torch.randn(args.batch, 3, *size, device=device)
    teachers = torch.arange(args.batch, device=device) % student.num_teachers
    grid = student.grid_size(x)
    leaves = [*student.parameters(), *dense.parameters()]

    def zero_grads() -> None:
        for p in leaves:
            p.grad = None

    def student_loss(project: bool) -> Callable[[], Tensor]:
        def loss() -> Tensor:
            out = student(x, teachers)
            taps, aux = out.taps, out.aux_loss
            total = sum(t.float().mean() for t in taps) + aux
            if project:
                maps = student.project_by_teacher(taps, teachers, grid)
                total = total + sum(m.float().mean() for per_tap in maps.values() for m in per_tap)
            return total

        return loss

    def checkpointed(loss: Callable[[], Tensor]) -> Callable[[], Tensor]:
        # The recomputation in the backward pass is recorded in the graph: the switch can go off again.
        def run() -> Tensor:
            student.set_grad_checkpointing(True)
            try:
                return loss()
            finally:
                student.set_grad_checkpointing(False)

        return run

    def dense_loss() -> Tensor:
        return dense.forward_features(x).float().mean()

    harness.describe(args, device, memory=True)
    print(
        f"sizes: batch {args.batch}, {size[0]}x{size[1]} images, width {student.embed_dim}, "
        f"{len(student.blocks)} blocks, dual-stream blocks {list(student.moe_layers)}, teachers "
        f"{list(student.teacher_dims)} (ids cycled over the batch); dispatch {args.dispatch!r}"
    )
    print(
        "student step: forward + backward of model(x, teacher_ids), "
        "loss = Σ tap means + aux; "
        "'+ projectors' adds every sample's own teacher's projector heads on all taps (Stage 1's "
        "project_by_teacher); dense: timm forward_features + backward of the mean"
    )
    for mode in args.modes.split(","):
        student.train(mode == "train")
        dense.train(mode == "train")
        if mode == "train":
            runs = {
                "dense timm ViT-B": harness.train_call(dense_loss, amp),
                "student": harness.train_call(student_loss(project=False), amp),
                "student + projectors": harness.train_call(student_loss(project=True), amp),
                CHECKPOINTED: harness.train_call(checkpointed(student_loss(project=True)), amp),
            }
        else:
            runs = {
                "dense timm ViT-B": harness.inference_call(lambda: dense.forward_features(x), amp),
                "student": harness.inference_call(lambda: student(x, teachers), amp),
            }
        cases = [harness.Case(name, run, zero_grads) for name, run in runs.items()]
        flops = {name: harness.count_flops(run) for name, run in runs.items()}
        zero_grads()
        results = harness.run_interleaved(cases, args.repeats, args.warmup, device)
        harness.measure_memory(cases, results, device, [student])
        what = "forward + backward, train mode" if mode == "train" else "forward only, eval mode, no_grad"
        harness.report(f"{mode}: {what}", results)
        base = "dense timm ViT-B"
        if CHECKPOINTED in results:
            harness.ratio(
                "train checkpointed / student + projectors",
                results[CHECKPOINTED],
                results["student + projectors"],
                None,
                flops[CHECKPOINTED] / flops["student + projectors"],
            )
        for name in runs:
            if name not in (base, CHECKPOINTED):
                target = TARGET_TRAIN if mode == "train" and name == "student" and not args.quick else None
                harness.ratio(
                    f"{mode} {name} / dense", results[name], results[base], target, flops[name] / flops[base]
                )
    print("\nFLOP ratio: matrix-product and attention FLOPs counted by torch.utils.flop_counter.")
    harness.finish()


if __name__ == "__main__":
    main()
