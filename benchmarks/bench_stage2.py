"""Stage-2 task passes: sharing the context-free work against one full backbone pass per task.

Inference (eval mode, no_grad), per batch size in ``--batches``:
(a) ``per task``: for every task, a full student pass on its task context and the task's head — what the
    authors' code does;
(b) ``shared``: ``PrismMultiTask(x)`` — the blocks before the first dual-stream block, and that block's
    attention, λ, anchor, shared expert and router input gate, run once; the task passes run batched.
Training step (train mode, forward + backward of Σ output means + the load-balancing terms), batch
``--train-batch``:
(a) the T task passes and the teacher pass (per-sample teacher ids, with its projector heads) one after
    another;
(b) ``MultiTaskStep``, the trainer's forward: all T + 1 passes through ``PrismViT.forward_passes``.
Both sides compute the same outputs (checked before timing). The FLOP ratio (a)/(b) from
torch.utils.flop_counter is the speed-up the sharing can give at best.

Default: ViT-B/16 student (dual-stream blocks 2/5/8/11) with PASCAL-Context's five tasks and three
ViT-L-width teachers, at 224 px to keep CPU runs short (``--img-size 512`` is PASCAL's Stage-2 size).
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

import harness
from prism_vfm.data.registry import DATASETS
from prism_vfm.finetune.trainer import MultiTaskStep
from prism_vfm.models.multitask import PrismMultiTask

TARGET_INFERENCE = 1.12
QUICK = dict(patch_size=8, embed_dim=32, depth=4, num_heads=2, moe_layers=(1, 3), teacher_dims=(16, 24, 16))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_args(parser)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batches", default="1,8", help="comma-separated inference batch sizes")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--dataset", default="pascalcontext", choices=sorted(DATASETS))
    parser.add_argument("--modes", default="eval,train", help="comma-separated: eval, train")
    args = parser.parse_args(argv)
    if harness.in_processes(args, argv):
        return
    if args.quick:
        args.img_size, args.batches, args.train_batch = 32, "1,2", 2
    device = harness.setup(args)
    amp = harness.autocast(args, device)
    student_args: dict = dict(img_size=args.img_size, teacher_dims=(1024, 1024, 1024), projectors=True)
    if args.quick:
        student_args.update(QUICK)
    torch.manual_seed(0)
    model = PrismMultiTask(student_args, dict(DATASETS[args.dataset].tasks)).to(device)
    student, tasks = model.student, model.task_names

    harness.describe(args, device, memory=True)
    print(
        f"model: width {student.embed_dim}, {len(student.blocks)} blocks, dual-stream blocks "
        f"{list(student.moe_layers)}, tasks {tasks}, {args.img_size}x{args.img_size} images"
    )
    for mode in args.modes.split(","):
        if mode == "eval":
            for b in (int(v) for v in args.batches.split(",")):
                bench_inference(model, b, args, device, amp)
        elif mode == "train":
            bench_training(model, args, device, amp)
        else:
            raise SystemExit(f"unknown mode {mode!r}; expected eval or train")
    print("\nFLOP ratio: matrix-product and attention FLOPs counted by torch.utils.flop_counter.")
    harness.finish()


def per_task(model: PrismMultiTask, x: Tensor) -> dict[str, Tensor]:
    """Every task's output from its own full pass, as the authors' code computes them."""
    size = (x.shape[-2], x.shape[-1])
    taps = {t: model.student(x, model.task_id(t), kind="task").taps for t in model.task_names}
    return {t: model.decode(t, taps[t], size) for t in model.task_names}


def bench_inference(
    model: PrismMultiTask, b: int, args: argparse.Namespace, device: torch.device, amp
) -> None:
    model.eval()
    tasks = model.task_names
    x = torch.randn(b, 3, args.img_size, args.img_size, device=device)
    with torch.no_grad(), amp:
        shared, separate = model(x).predictions, per_task(model, x)
    worst = max(float((shared[t].float() - separate[t].float()).abs().max()) for t in tasks)
    runs = {"per task": lambda: per_task(model, x), "shared": lambda: model(x)}
    flops = {name: harness.count_flops(run) for name, run in runs.items()}
    cases = [harness.Case(name, harness.inference_call(run, amp)) for name, run in runs.items()]
    results = harness.run_interleaved(cases, args.repeats, args.warmup, device)
    harness.measure_memory(cases, results, device)
    harness.report(f"eval: all {len(tasks)} tasks, batch {b} (max |shared - per task| {worst:.1e})", results)
    harness.ratio(
        f"eval batch {b} speed-up per task / shared",
        results["per task"],
        results["shared"],
        None if args.quick else TARGET_INFERENCE,
        flops["per task"] / flops["shared"],
        at_least=True,
    )


def bench_training(model: PrismMultiTask, args: argparse.Namespace, device: torch.device, amp) -> None:
    model.train()
    student, tasks = model.student, model.task_names
    b = args.train_batch
    x = torch.randn(b, 3, args.img_size, args.img_size, device=device)
    size, grid = (args.img_size, args.img_size), student.grid_size(x)
    ids = torch.arange(b) % student.num_teachers
    step = MultiTaskStep(model)

    def separate() -> Tensor:
        total = torch.zeros((), device=device)
        for t in tasks:
            out = student(x, model.task_id(t), kind="task")
            total = total + model.decode(t, out.taps, size).float().mean() + out.aux_loss / len(tasks)
        out = student(x, ids, kind="teacher")
        maps = student.project_by_teacher(out.taps, ids, grid)
        return total + out.aux_loss + sum(m.float().mean() for per_tap in maps.values() for m in per_tap)

    def batched() -> Tensor:
        outputs, maps, aux_tasks, aux_teacher = step(x, ids)
        total = sum(o.float().mean() for o in outputs.values()) + aux_tasks + aux_teacher
        return total + sum(m.float().mean() for per_tap in maps.values() for m in per_tap)

    def zero_grads() -> None:
        for p in model.parameters():
            p.grad = None

    runs = {"per pass": harness.train_call(separate, amp), "shared": harness.train_call(batched, amp)}
    flops = {name: harness.count_flops(run) for name, run in runs.items()}
    zero_grads()
    cases = [harness.Case(name, run, zero_grads) for name, run in runs.items()]
    results = harness.run_interleaved(cases, args.repeats, args.warmup, device)
    harness.measure_memory(cases, results, device, [model])
    harness.report(
        f"train: {len(tasks)} task passes + the teacher pass, forward + backward, batch {b}", results
    )
    harness.ratio(
        f"train batch {b} speed-up per pass / shared",
        results["per pass"],
        results["shared"],
        None,
        flops["per pass"] / flops["shared"],
    )


if __name__ == "__main__":
    main()
