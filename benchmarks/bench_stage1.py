"""Stage-1 training throughput: images/s of a whole distillation step and the share spent in the teachers.

Builds a Stage-1 preset's student and teachers exactly as ``prism distill`` does (random weights: speed
does not depend on them) and times, interleaved:

(1) ``teachers``: the frozen teachers' forward passes alone, each on its share of the batch (balanced
    per-sample split), under the preset's precision;
(2) ``step``: one whole optimisation step as the trainer runs it — ``distill_loss`` (student forward on
    teacher contexts, projector heads, the teachers, the loss) + backward + gradient clipping + AdamW.

images/s = batch / median(step); teacher share = median(teachers) / median(step); the student's share
is the rest. Data loading is measured apart when ``--data`` names an image folder: the preset's loader
(its workers, decoding and augmentation) drained for ``--loader-batches`` batches, as images/s, to
compare with the step's rate. On CUDA, model FLOPs utilisation = FLOPs of a step (torch.utils.flop_counter:
student forward + backward, teacher forwards) / step time / ``--peak-tflops``.

CPU default: the ``tiny`` preset. GPU (the issue's setting):
``python benchmarks/bench_stage1.py --preset LB --img-size 384 --device cuda --dtype bf16 --batch 64``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

import harness
from prism_vfm.data.image_folder import build_stage1_loader
from prism_vfm.distill.assignment import balanced_teacher_split
from prism_vfm.distill.config import preset
from prism_vfm.distill.student import build_student
from prism_vfm.distill.trainer import build_criterion, distill_loss, param_groups
from prism_vfm.teachers import build_teacher


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_args(parser)
    parser.add_argument("--preset", default="tiny", help="Stage-1 preset: tiny (default), BB, BS, LB, LL")
    parser.add_argument("--img-size", type=int, default=None, help="student input side (default: preset's)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: preset's)")
    parser.add_argument("--data", default=None, help="an image folder: also measure the data loader")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: preset's)")
    parser.add_argument("--loader-batches", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device peak (H100 SXM bf16 dense)")
    args = parser.parse_args(argv)
    if harness.in_processes(args, argv):
        return
    cfg = preset(args.preset)
    img = args.img_size or cfg.student.img_size
    cfg = dataclasses.replace(
        cfg,
        student=dataclasses.replace(cfg.student, img_size=img, init="none"),
        teachers=dataclasses.replace(cfg.teachers, weights="none"),
    )
    batch = args.batch or (3 if args.quick else cfg.batch_size)
    device = harness.setup(args)
    amp = harness.autocast(args, device)

    teachers = [build_teacher(name, img, "none").to(device) for name in cfg.teachers.names]
    model = build_student(cfg.student, teacher_dims=[t.out_dim for t in teachers]).to(device).train()
    criterion = build_criterion(cfg)
    optimizer = torch.optim.AdamW(param_groups(model, 1e-4, cfg.optim.pretrained_lr_scale, 0.05), lr=1e-4)
    x = torch.randn(batch, 3, img, img, device=device)
    ctx = balanced_teacher_split(batch, len(teachers), torch.Generator().manual_seed(0))
    shares = {t: x.index_select(0, (ctx == t).nonzero().squeeze(1).to(device)) for t in range(len(teachers))}

    def run_teachers() -> None:
        with torch.no_grad(), amp:
            for t, teacher in enumerate(teachers):
                if len(shares[t]):
                    teacher(shares[t])

    def forward_backward() -> None:
        with amp:
            loss, _, _ = distill_loss(model, model, teachers, criterion, x, ctx, cfg.loss.lb_weight)
        loss.backward()

    def run_step() -> None:
        forward_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    harness.describe(args, device, memory=True)
    n_student = sum(p.numel() for p in model.parameters())
    print(
        f"preset {args.preset}: student {cfg.student.model} at {img}px ({n_student / 1e6:.1f}M parameters "
        f"with projectors), teachers {list(cfg.teachers.names)} (random weights), batch {batch}, balanced "
        f"per-sample teacher split {[len(shares[t]) for t in range(len(teachers))]}"
    )
    cases = [harness.Case("teachers", run_teachers), harness.Case("step", run_step)]
    results = harness.run_interleaved(cases, args.repeats, args.warmup, device)
    harness.measure_memory(cases, results, device, [model])
    harness.report(
        "stage-1 step: distill_loss + backward + clip + AdamW; teachers: their forwards alone", results
    )
    step, teach = results["step"].median, results["teachers"].median
    print(f"throughput: {batch / step:.1f} images/s per process (median step {step * 1e3:.1f} ms)")
    print(
        f"teacher share of the step: {teach / step:.1%}; "
        f"student (forward, backward, optimiser): {1 - teach / step:.1%}"
    )
    if device.type == "cuda":
        flops = harness.count_flops(forward_backward) + harness.count_flops(run_teachers)
        model.zero_grad(set_to_none=True)
        achieved = flops / step / 1e12
        print(
            f"model FLOPs per step {flops / 1e12:.2f} TFLOP; {achieved:.1f} TFLOP/s; "
            f"MFU {achieved / args.peak_tflops:.1%} of {args.peak_tflops:.0f} TFLOP/s"
        )
    if args.data:
        workers = cfg.workers if args.workers is None else args.workers
        loader = build_stage1_loader(args.data, img, batch, workers, seed=0)
        it = iter(loader)
        next(it)  # workers started
        tic, n = time.perf_counter(), 0
        for _ in range(args.loader_batches):
            try:
                n += len(next(it))
            except StopIteration:
                break
        rate = n / (time.perf_counter() - tic)
        print(
            f"data loader ({workers} workers): {rate:.1f} images/s; "
            f"{'enough' if rate >= batch / step else 'NOT enough'} for the step's {batch / step:.1f} images/s"
        )
    harness.finish()


if __name__ == "__main__":
    main()
