"""VidPrism's whole training step at the released size on a GPU: clips/s, MFU and peak memory per batch.

The step the trainer runs (``prism video train``): CLIP ViT-B/16 frame tower (random weights: speed does not
depend on them; ``pretrained=False``) with activation checkpointing on every block, the released head (K400's
400 classes), the released loss with its class-text term, backward, AdamW over the two learning-rate groups,
under bf16 autocast with fp32 weights. Clips of 32 frames at 224².

Per batch size (``--batches``, from the smallest; a batch that does not fit ends the search, as does the
``--budget`` of seconds): the median step time over ``--repeats`` steps after ``--warmup``, clips/s,
``torch.cuda.max_memory_allocated``, and MFU = model FLOPs / step time / the device's bf16 peak. Model FLOPs
are counted with ``torch.utils.flop_counter`` on one step at batch 1 without activation checkpointing
(forward + backward; scaled by the batch, which they are linear in); the recomputed forward of
checkpointing is counted apart, as hardware FLOPs (HFU). The peak comes from the device name
(``harness.PEAK_BF16_TFLOPS``; another device: MFU unknown, ``--peak-tflops`` gives it).

    python benchmarks/bench_vidprism_step.py --device cuda --dtype bf16       # batches 8, 16, 24, 32
    python benchmarks/bench_vidprism_step.py --quick                          # CPU smoke: tiny tower
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import harness
from prism_vfm.video import HeadConfig, VidPrism, released_loss
from prism_vfm.video.backbone import TowerConfig, tower_config

QUICK_TOWER = TowerConfig(patch_size=8, width=32, depth=2, heads=2, output_dim=16, img_size=32)


def build_parser() -> argparse.ArgumentParser:
    """The command's options (defaults: the released training size)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_args(parser)
    parser.add_argument("--tower", default="ViT-B/16", help="ViT-B/16 (default) or ViT-L/14")
    parser.add_argument("--frames", type=int, default=32, help="frames per clip (default 32)")
    parser.add_argument("--batches", default="8,16,24,32", help="clips per step to try (default 8,16,24,32)")
    parser.add_argument("--classes", type=int, default=400, help="classifier outputs (default 400)")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds for the search (default 120)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device bf16 peak (default: by name)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    device = harness.setup(args)
    start = time.monotonic()
    amp = harness.autocast(args, device)
    tower = QUICK_TOWER if args.quick else tower_config(args.tower)
    frames = 8 if args.quick else args.frames
    batches = [2] if args.quick else sorted(int(b) for b in args.batches.split(","))
    dim, side = tower.output_dim, tower.img_size
    model = VidPrism(tower, HeadConfig(dim=dim, num_classes=args.classes), grad_checkpointing=True)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.param_groups(1e-4, 0.07), lr=1e-4, weight_decay=0.2)
    class_text = F.normalize(torch.randn(args.classes, dim, device=device), dim=-1)

    def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        clips = torch.randn(batch, frames, 3, side, side, device=device)
        return clips, torch.randint(0, args.classes, (batch,), device=device)

    def step(clips: torch.Tensor, labels: torch.Tensor) -> None:
        with amp:
            loss = released_loss(model(clips), labels, class_text).total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    method = f"method: median of {args.repeats} steps after {args.warmup} untimed ones, per batch"
    print(f"torch {torch.__version__}; device {name}; {method}")
    peak = args.peak_tflops or (harness.peak_bf16_tflops(name) if device.type == "cuda" else None)
    n_params = sum(p.numel() for p in model.parameters())
    shown_peak = f"{peak:g} TFLOP/s" if peak else "unknown"
    print(
        f"model: {'tiny tower' if args.quick else args.tower} + head, {n_params / 1e6:.1f}M parameters, "
        f"random weights; clips of {frames} frames at {side}²; activation checkpointing on; {args.dtype}; "
        f"AdamW; bf16 peak {shown_peak}"
    )

    # FLOPs per clip: the model's (checkpointing off) and the recomputation's (on), counted at batch 1.
    one = inputs(1)
    model.backbone.set_grad_checkpointing(False)
    model_flops = harness.count_flops(lambda: step(*one))
    model.backbone.set_grad_checkpointing(True)
    hardware_flops = harness.count_flops(lambda: step(*one))
    shown = f"model {model_flops / 1e9:.4g} G, with the recomputed forward {hardware_flops / 1e9:.4g} G"
    print(f"FLOPs per clip: {shown}")

    fitted = []
    for batch in batches:
        left = args.budget - (time.monotonic() - start)
        if left <= 0:
            print(f"batch {batch}: not tried (budget of {args.budget:g} s spent)")
            break
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            clips, labels = inputs(batch)
            times = []
            for i in range(args.warmup + args.repeats):
                tic = time.perf_counter()
                step(clips, labels)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= args.warmup:
                    times.append(time.perf_counter() - tic)
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            print(f"batch {batch}: out of memory")
            break
        median = statistics.median(times)
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        achieved = model_flops * batch / median / 1e12
        hfu = hardware_flops * batch / median / 1e12
        mfu = f"MFU {achieved / peak:.1%} (HFU {hfu / peak:.1%})" if peak else "MFU unknown"
        fitted.append(batch)
        print(
            f"throughput vidprism step batch {batch}: {batch / median:.2f} clips/s ({median * 1e3:.0f} ms "
            f"per step, {achieved:.3g} model TFLOP/s), {mfu}, peak memory {memory:.2f} GiB"
        )
    print(f"largest batch that fitted: {max(fitted) if fitted else 'none'} (tried {batches})")
    harness.finish()


if __name__ == "__main__":
    main()
