"""The VidPrism head against the released way of computing it, same weights and inputs, side by side.

Times one training step of the head alone — forward and backward of the released loss (CE + gate + text
+ diversity + rank, train mode) on frame features (B, T, D) — and the eval-mode forward, for
:class:`prism_vfm.video.VidPrismHead` and for the reference in ``tests/video_reference.py``, which runs
the released order of operations (RgSTA window by window and sample by sample, DBI pair by pair with
every passing update computed, the diversity loss pair of samples by pair). Both are first checked to
agree. The released head itself measured 775 ms forward+backward and 293 ms eval forward at B = 32,
T = 32, D = 512 on the project's 2-core CPU. Run ``python benchmarks/bench_vidprism_head.py --help``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import harness
from prism_vfm.video import HeadConfig, VidPrismHead, released_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the reference lives in the tests
from tests.video_reference import reference_forward, reference_loss  # noqa: E402

TARGET_TRAIN = 2.0  # speed-up of forward + backward over the released computation


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_args(parser)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=400)
    parser.add_argument("--modes", default="train,eval", help="comma-separated: train (fwd+bwd), eval (fwd)")
    args = parser.parse_args(argv)
    if harness.in_processes(args, argv):
        return
    if args.quick:
        args.batch, args.frames, args.dim, args.classes = 4, 8, 32, 10
    device = harness.setup(args)
    amp = harness.autocast(args, device)
    head = VidPrismHead(HeadConfig(dim=args.dim, num_classes=args.classes)).to(device)
    x = torch.randn(args.batch, args.frames, args.dim, device=device)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    text = F.normalize(torch.randn(args.classes, args.dim, device=device), dim=-1)

    def zero_grads() -> None:
        head.zero_grad(set_to_none=True)

    def head_loss() -> torch.Tensor:
        return released_loss(head(x), labels, text).total

    def reference_step() -> torch.Tensor:
        return reference_loss(reference_forward(head, x), labels, text)["loss"]

    harness.describe(args, device, memory=True)
    print(
        f"sizes: batch {args.batch}, {args.frames} frames, width {args.dim}, {args.classes} classes, rates "
        f"{list(head.cfg.rates)}; step: forward + backward of the released loss with class text "
        "embeddings; the reference is tests/video_reference.py (the released order of operations)"
    )
    head.eval()
    with torch.no_grad(), amp:
        gap = (head(x).logits - reference_forward(head, x)["logits"]).abs().max().item()
    print(f"agreement: max |logits(head) - logits(reference)| = {gap:.2e}")

    reference_name, head_name = "released loops (reference)", "VidPrismHead"
    for mode in args.modes.split(","):
        head.train(mode == "train")
        if mode == "train":
            runs = {
                reference_name: harness.train_call(reference_step, amp),
                head_name: harness.train_call(head_loss, amp),
            }
        else:
            runs = {
                reference_name: harness.inference_call(lambda: reference_forward(head, x), amp),
                head_name: harness.inference_call(lambda: head(x), amp),
            }
        cases = [harness.Case(name, run, zero_grads) for name, run in runs.items()]
        flops = {name: harness.count_flops(run) for name, run in runs.items()}
        zero_grads()
        results = harness.run_interleaved(cases, args.repeats, args.warmup, device)
        harness.measure_memory(cases, results, device)
        what = "forward + backward, train mode" if mode == "train" else "forward only, eval mode, no_grad"
        harness.report(f"{mode}: {what}", results)
        target = TARGET_TRAIN if mode == "train" and not args.quick else None
        harness.ratio(
            f"{mode} released loops / head (speed-up)",
            results[reference_name],
            results[head_name],
            target,
            flops[reference_name] / flops[head_name],
            at_least=True,
        )
    print("\nFLOP ratio: matrix-product and attention FLOPs counted by torch.utils.flop_counter.")
    harness.finish()


if __name__ == "__main__":
    main()
