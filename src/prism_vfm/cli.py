"""The ``prism`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, cast

import torch

from prism_vfm.data.registry import get_dataset
from prism_vfm.errors import PrismError

if TYPE_CHECKING:
    from prism_vfm import PrismViT
    from prism_vfm.video import VidPrism
    from prism_vfm.video.fewshot import EvalSettings
    from prism_vfm.video.train_config import VideoTrainConfig


def _load_any(source: str, img_size: Sequence[int] | None, step: int | str | None = None) -> torch.nn.Module:
    """Any model source (``prism_vfm.models.load``); what was loaded is shown on stderr."""
    from prism_vfm.models.load import load

    model, report = load(source, img_size=img_size, step=step)
    print(f"prism: {report.summary()}", file=sys.stderr)
    return model


def _check_folder(path: str | Path | None, what: str) -> None:
    """ValueError, before any work starts, when output folder ``path`` cannot be one: it, or the nearest
    part of it that exists, is a file."""
    if path is None or str(path) == "":
        return
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is" if existing == Path(path) else f"lies under {existing}, which is"
        raise ValueError(f"{what} {path} {where} a file, not a folder")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path}: {existing} is not writable")


def cmd_info(args: argparse.Namespace) -> None:
    from prism_vfm import PrismMultiTask
    from prism_vfm.video import VidPrism

    loaded = _load_any(args.model, args.img_size, args.step)
    if isinstance(loaded, VidPrism):
        print(json.dumps(_vidprism_info(loaded), indent=2))
        return
    model = cast("PrismViT", getattr(loaded, "student", loaded))
    info = {
        "image_size": list(model.patch_embed.img_size),
        "width": model.embed_dim,
        "depth": len(model.blocks),
        "dual_stream_blocks": list(model.moe_layers),
        "taps": list(model.tap_layers),
        "experts": model.moe_config.num_experts,
        "top_k": model.moe_config.top_k,
        "teachers": len(model.teacher_dims),
        "tasks": loaded.task_names if isinstance(loaded, PrismMultiTask) else model.num_tasks,
        "parameters": model.count_parameters(),
        "backbone_parameters": model.count_parameters(backbone_only=True),
        "active_backbone_parameters": model.count_parameters(active=True, backbone_only=True),
    }
    if isinstance(loaded, PrismMultiTask):
        info["decoder_head_parameters"] = sum(p.numel() for p in loaded.heads.parameters())
    print(json.dumps(info, indent=2))


def _vidprism_info(model: VidPrism) -> dict[str, object]:
    """What ``prism info`` shows of a VidPrism model."""
    from dataclasses import asdict

    def count(module: torch.nn.Module | None) -> int:
        return 0 if module is None else sum(p.numel() for p in module.parameters())

    return {
        "model": "VidPrism",
        "tower": asdict(model.backbone.config),
        "head": asdict(model.head.cfg),
        "text_tower": model.text is not None,
        "tower_parameters": count(model.backbone),
        "head_parameters": count(model.head),
        "text_tower_parameters": count(model.text),
    }


def cmd_convert(args: argparse.Namespace) -> None:
    from prism_vfm import PrismMultiTask, PrismViT, export_official

    src, out = Path(args.source), Path(args.output)
    if src.is_dir():
        if out.is_dir():
            raise ValueError(f"output {out} is a folder; converting a folder writes one official .pth file")
        _check_folder(out.parent, "the folder of output")
    else:
        _check_folder(out, "output")
    model = _load_any(args.source, args.img_size, args.step)
    if src.is_dir():
        if not isinstance(model, PrismViT):
            what = "a multi-task model" if isinstance(model, PrismMultiTask) else f"a {type(model).__name__}"
            raise ValueError(f"{src} holds {what}: the official layout written here is the Stage-1 student's")
        export_official(model, out)
        print(f"wrote official-layout checkpoint {out}")
    else:
        cast("PrismViT", model).save_pretrained(out)
        print(f"wrote {out}/config.json and {out}/model.safetensors")


def cmd_smoke(args: argparse.Namespace) -> None:
    from prism_vfm.smoke import run_smoke

    _check_folder(args.out, "--out")
    summary = run_smoke(steps=args.steps, out_dir=Path(args.out), seed=args.seed, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))


def cmd_demo(args: argparse.Namespace) -> None:
    from prism_vfm.data.registry import HEADLINE_METRICS
    from prism_vfm.demo.pipeline import run_demo

    if args.seed < 0:
        raise SystemExit(f"prism demo: --seed must be >= 0, got {args.seed}")
    if args.workers is not None and args.workers < 1:
        raise SystemExit(f"prism demo: --workers must be >= 1, got {args.workers}")
    result = run_demo(
        args.out, quick=args.quick, seed=args.seed, cache_dir=args.cache_dir, workers=args.workers
    )
    scores = {t: round(s[HEADLINE_METRICS[t]], 3) for t, s in result.metrics["scores"].items()}
    print(json.dumps({"scores": scores, "delta_m": round(result.metrics["delta_m"], 3)}, indent=2))
    print(f"report: {result.report} (figures in {result.out / 'figures'})")


def cmd_distill(args: argparse.Namespace) -> None:
    from prism_vfm.config import apply_overrides, load_yaml
    from prism_vfm.distill.config import Stage1Config, preset
    from prism_vfm.distill.trainer import train_stage1

    cfg = preset(args.preset)
    if args.config:
        cfg = load_yaml(Stage1Config, args.config, base=cfg)
    if args.ablation:
        from prism_vfm.ablation import apply_ablation

        cfg = apply_ablation(cfg, args.ablation)
    direct = [("data", args.data), ("out", args.out), ("teachers.weights", args.teachers_dir)]
    cfg = apply_overrides(cfg, [(k, v) for k, v in direct if v is not None] + list(args.set))
    if not cfg.data:
        raise SystemExit("prism distill: no image folder given (--data PATH or data: in the config file)")
    _check_folder(cfg.out, "run folder (out)")
    run = train_stage1(
        cfg, resume=args.resume, overwrite=args.overwrite, allow_config_change=args.allow_config_change
    )
    print(f"run saved in {run}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from prism_vfm.config import apply_overrides, load_yaml
    from prism_vfm.finetune.config import Stage2Config, preset
    from prism_vfm.finetune.trainer import train_stage2

    cfg = preset(args.preset or {"pascal": "pascal", "nyud": "nyud"}.get(args.dataset or "pascal", "pascal"))
    if args.config:
        cfg = load_yaml(Stage2Config, args.config, base=cfg)
    if args.ablation:
        from prism_vfm.ablation import apply_ablation

        cfg = apply_ablation(cfg, args.ablation)
    dataset = get_dataset(args.dataset).name if args.dataset else None
    direct = [("dataset", dataset), ("data", args.data), ("init", args.init), ("out", args.out)]
    cfg = apply_overrides(cfg, [(k, v) for k, v in direct if v is not None] + list(args.set))
    if not cfg.data or not cfg.init:
        raise SystemExit(
            "prism finetune: give the data set folder (--data) and a Stage-1 checkpoint (--init)"
        )
    _check_folder(cfg.out, "run folder (out)")
    run = train_stage2(
        cfg, resume=args.resume, overwrite=args.overwrite, allow_config_change=args.allow_config_change
    )
    print(f"run saved in {run}")


def _video_train_config(args: argparse.Namespace, command: str) -> VideoTrainConfig:
    """The training configuration of ``--preset``, ``--config``, ``--data``, ``--init`` and ``--set``."""
    from prism_vfm.config import apply_overrides, load_yaml
    from prism_vfm.video.train_config import VideoTrainConfig, preset

    cfg = preset(args.preset)
    if args.config:
        cfg = load_yaml(VideoTrainConfig, args.config, base=cfg)
    direct = [("data.root", args.data), ("model.init", args.init)]
    if command == "train":
        direct.append(("out", args.out))
    if getattr(args, "fsdp", False):
        direct.append(("fsdp", True))
    cfg = apply_overrides(cfg, [(k, v) for k, v in direct if v is not None] + list(args.set))
    if not (cfg.data.root or cfg.data.train_list or cfg.data.features):
        raise SystemExit(
            f"prism video {command}: give the data set folder (--data), data.train_list or data.features"
        )
    return cfg


def cmd_video_train(args: argparse.Namespace) -> None:
    from prism_vfm.video.train import check_video_train, train_video

    cfg = _video_train_config(args, "train")
    if args.dry_run:
        print(check_video_train(cfg))
        return
    run = train_video(
        cfg, resume=args.resume, overwrite=args.overwrite, allow_config_change=args.allow_config_change
    )
    print(f"run saved in {run}")


def cmd_video_evaluate(args: argparse.Namespace) -> None:
    from prism_vfm.train.distributed import init_distributed
    from prism_vfm.video.evaluate import evaluate_video

    env = init_distributed()  # under torchrun every process scores its part of the list
    data = Path(args.data) if args.data else None
    given = {"list": args.list, "labels": args.labels, "videos": args.videos}
    defaults = {"list": "val.txt", "labels": "labels.csv", "videos": "videos"}
    paths: dict[str, str | Path] = {}
    for key, value in given.items():
        if value is None and data is None:
            raise SystemExit(f"prism video evaluate: give --data DIR or --{key}")
        paths[key] = value if value is not None else cast(Path, data) / defaults[key]
    result = evaluate_video(
        args.checkpoint,
        paths["list"],
        paths["labels"],
        paths["videos"],
        dataset=args.dataset,
        out=args.out,
        num_frames=args.frames,
        size=args.size,
        test_clips=args.clips,
        test_crops=args.crops,
        average=args.average,
        blend=args.blend,
        batch_size=args.batch_size,
        workers=args.workers,
        device=str(env.device) if env.world_size > 1 else args.device,
    )
    if env.is_main:
        print(json.dumps({"scores": result["scores"], "views": result["views"]}, indent=2))


def cmd_video_analyze(args: argparse.Namespace) -> None:
    from prism_vfm.models.load import load
    from prism_vfm.video.expert_report import analyse_head
    from prism_vfm.video.feature_model import FeatureClassifier

    model, report = load(args.run)
    if not isinstance(model, FeatureClassifier):
        raise SystemExit(
            f"prism video analyze: {args.run} holds a {type(model).__name__} ({report.kind}); expected a "
            "head trained on cached features (prism video train with data.features)"
        )
    result = analyse_head(model, args.features, args.split, args.out)
    shown = {k: result[k] for k in ("accuracy", "reversal") if k in result}
    print(json.dumps(shown, indent=2))
    if args.out:
        print(f"analysis: {Path(args.out) / 'analysis.json'}")


def cmd_video_demo(args: argparse.Namespace) -> None:
    from prism_vfm.video.demo.pipeline import run_video_demo

    if args.seed < 0:
        raise SystemExit(f"prism video demo: --seed must be >= 0, got {args.seed}")
    result = run_video_demo(
        args.out, quick=args.quick, seed=args.seed, cache_dir=args.cache_dir, finetune=args.finetune
    )
    print(json.dumps(result.headline, indent=2))
    print(f"report: {result.report} (figures in {result.out / 'figures'})")


def cmd_video_zeroshot(args: argparse.Namespace) -> None:
    from prism_vfm.train.distributed import init_distributed
    from prism_vfm.video.zeroshot import zero_shot

    env = init_distributed()
    summary = zero_shot(
        args.checkpoint,
        args.protocol,
        root=args.root,
        overrides=args.set,
        out=args.out,
        text_weights=args.text_weights,
        blend=args.blend,
        batch_size=args.batch_size,
        workers=args.workers,
        device=str(env.device) if env.world_size > 1 else args.device,
    )
    if env.is_main:
        print(json.dumps({k: summary[k] for k in ("top1", "top5", "splits")}, indent=2))


def _eval_settings(args: argparse.Namespace) -> EvalSettings:
    from prism_vfm.train.distributed import init_distributed
    from prism_vfm.video.fewshot import EvalSettings

    env = init_distributed()  # under torchrun the runs train, and are scored, on every process
    return EvalSettings(
        frames=args.frames,
        size=args.size,
        clips=args.clips,
        crops=args.crops,
        average=args.average,
        blend=args.blend,
        text_weights=args.text_weights,
        batch_size=args.batch_size,
        workers=args.workers,
        device=str(env.device) if env.world_size > 1 else args.device,
    )


def cmd_video_fewshot(args: argparse.Namespace) -> None:
    from prism_vfm.video.fewshot import few_shot

    _check_folder(args.out, "few-shot folder (--out)")
    summary = few_shot(
        _video_train_config(args, "fewshot"),
        args.out,
        shots=args.shots,
        seeds=args.seeds,
        settings=_eval_settings(args),
    )
    print(json.dumps(summary["top1_mean_std"], indent=2))
    print(f"report: {Path(args.out) / 'fewshot.md'}")


def cmd_video_base2novel(args: argparse.Namespace) -> None:
    from prism_vfm.video.fewshot import base_to_novel

    _check_folder(args.out, "base-to-novel folder (--out)")
    summary = base_to_novel(
        _video_train_config(args, "base2novel"),
        args.out,
        shots=args.shots,
        seeds=args.seeds,
        settings=_eval_settings(args),
    )
    print(json.dumps({k: summary[k] for k in ("base", "novel", "harmonic_mean")}, indent=2))
    print(f"report: {Path(args.out) / 'base2novel.md'}")


def cmd_video_k600_novel(args: argparse.Namespace) -> None:
    from prism_vfm.video.data.classes import write_k600_novel

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("prism video k600-novel: runs in one process; launch it without torchrun")
    _check_folder(args.out, "output folder (--out)")
    path = write_k600_novel(
        args.k400_labels,
        args.k600_labels,
        args.out,
        seeds=args.seeds,
        per_split=args.per_split,
        expect_novel=args.novel_count or None,
        overwrite=args.overwrite,
    )
    print(f"novel-class splits and their protocol written: {path}")


def _read_baselines(path: str | None) -> dict[str, float] | None:
    """The ``--baselines`` JSON file ``{task: single-task score}``; ValueError naming what is wrong."""
    if not path:
        return None
    try:
        baselines = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--baselines {path} is not valid JSON: {exc}") from None
    if not isinstance(baselines, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in baselines.values()
    ):
        raise ValueError(f"--baselines {path} must hold an object {{task: single-task score}}")
    return {str(k): float(v) for k, v in baselines.items()}


def _check_baselines_exist(stage1: Any, dataset: str) -> None:
    """ValueError before any training when the sweep's evaluation would find no Δm baselines for the
    student's backbone (the student is built on the meta device: no memory, no weights)."""
    import timm

    from prism_vfm.data.registry import backbone_name

    student = stage1.student
    with torch.device("meta"):
        model = cast(
            "PrismViT",
            timm.create_model(
                student.model, pretrained=False, **dict(student.overrides, img_size=student.img_size)
            ),
        )
    get_dataset(dataset).baselines_for(backbone_name(model.embed_dim, len(model.blocks)))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from prism_vfm.evaluate import evaluate
    from prism_vfm.train.distributed import init_distributed

    _check_folder(args.out, "--out")
    baselines = _read_baselines(args.baselines)
    dataset = get_dataset(args.dataset).name
    env = init_distributed()  # under torchrun every process scores its part of the split
    result = evaluate(
        args.checkpoint,
        dataset,
        args.data,
        split=args.split,
        out=args.out,
        batch_size=args.batch_size,
        workers=args.workers,
        baselines=baselines,
        save_edges=args.save_edges,
        device=str(env.device) if env.world_size > 1 else args.device,
        img_size=tuple(args.img_size) if args.img_size else None,
        matcher=args.matcher,
    )
    if env.is_main:
        print(f"prism: {result['loaded']}", file=sys.stderr)
        print(json.dumps({"scores": result["scores"], "delta_m": result["delta_m"]}, indent=2))


def cmd_sweep(args: argparse.Namespace) -> None:
    from prism_vfm.ablation import run_sweep
    from prism_vfm.ablation.variants import VARIANTS
    from prism_vfm.config import apply_overrides, load_yaml
    from prism_vfm.distill.config import Stage1Config
    from prism_vfm.distill.config import preset as stage1_preset
    from prism_vfm.finetune.config import Stage2Config
    from prism_vfm.finetune.config import preset as stage2_preset

    if args.list:
        for v in VARIANTS.values():
            print(f"{v.name:18} {v.description}")
        print("top<k>, experts<E>, decorr_taps<taps>, expert_ratio<r>, teachers<positions>; join with +")
        return
    if not args.variants or not args.out:
        raise SystemExit("prism sweep: give --variants a,b,c and --out DIR (or --list)")
    stage1 = stage1_preset(args.preset)
    if args.config:
        stage1 = load_yaml(Stage1Config, args.config, base=stage1)
    direct = [("data", args.data), ("teachers.weights", args.teachers_dir)]
    stage1 = apply_overrides(stage1, [(k, v) for k, v in direct if v is not None] + list(args.set))
    if not stage1.data:
        raise SystemExit("prism sweep: no Stage-1 image folder given (--data PATH or data: in --config)")
    stage2 = None
    if args.stage2_data or args.stage2_preset or args.stage2_config or args.dataset:
        stage2 = stage2_preset(args.stage2_preset or args.dataset or "pascal")
        if args.stage2_config:
            stage2 = load_yaml(Stage2Config, args.stage2_config, base=stage2)
        dataset = get_dataset(args.dataset).name if args.dataset else None
        direct = [("dataset", dataset), ("data", args.stage2_data), ("distill.weights", args.teachers_dir)]
        stage2 = apply_overrides(stage2, [(k, v) for k, v in direct if v is not None] + list(args.stage2_set))
        if not stage2.data:
            raise SystemExit("prism sweep: Stage 2 needs its data set folder (--stage2-data)")
    _check_folder(args.out, "--out")
    baselines = _read_baselines(args.baselines)
    if stage2 is not None and not args.no_eval and baselines is None:
        _check_baselines_exist(stage1, stage2.dataset)
    from prism_vfm.train.distributed import init_distributed

    env = init_distributed()  # under torchrun every variant trains and evaluates on all processes
    rows = run_sweep(
        [v.strip() for v in args.variants.split(",") if v.strip()],
        stage1,
        args.out,
        stage2,
        split=None if args.no_eval else args.split,
        baselines=baselines,
        eval_workers=args.eval_workers,
        device=str(env.device) if env.world_size > 1 else args.device,
    )
    if env.is_main:
        print((Path(args.out) / "comparison.md").read_text())
        print(f"{len(rows)} variants; table in {args.out}/comparison.md and comparison.json")


def cmd_analyze(args: argparse.Namespace) -> None:
    from prism_vfm.analysis.report import analyze

    options = dict(
        data=args.data,
        kind=args.kind,
        contexts=args.contexts,
        images=args.images,
        batch_size=args.batch_size,
        device=args.device,
        img_size=args.img_size,
    )
    if args.analysis == "coactivation":
        options["threshold"] = args.threshold
    if args.analysis == "gradients":
        options.update(teachers=args.teachers, teachers_dir=args.teachers_dir)
    if args.analysis == "efficiency":
        options = dict(img_size=args.img_size, batch_size=args.batch_size or 1, device=args.device)
        options["latency"] = not args.no_latency
    elif args.batch_size is None:
        options.pop("batch_size")
    out = args.out or f"analysis/{args.analysis}"
    _check_folder(out, "--out")
    # What each checkpoint load took from its source, on stderr.
    shown = logging.StreamHandler(sys.stderr)
    shown.setFormatter(logging.Formatter("prism: %(message)s"))
    loading = logging.getLogger("prism_vfm.analysis.loading")
    loading.addHandler(shown)
    loading.setLevel(logging.INFO)
    try:
        summary = analyze(args.analysis, args.checkpoint, out, **options)
    except ValueError as exc:
        raise SystemExit(f"prism analyze {args.analysis}: {exc}") from None
    finally:
        loading.removeHandler(shown)
    print("\n".join(summary["files"]))


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (``prism distill: error: …``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def _step(text: str) -> int | str:
    """An argparse type: a checkpoint step (an integer >= 0) or ``best``."""
    return text if text == "best" else _count(0)(text)


def _run_folder_arguments(p: argparse.ArgumentParser) -> None:
    """--resume, --overwrite and --allow-config-change (prism_vfm.train.run)."""
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume", action="store_true", help="continue from the run folder's latest checkpoint"
    )
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in the output folder: removes its config.yaml, config_changes.yaml, "
        "metrics.jsonl, tensorboard/ and checkpoints/ (and refuses if the folder holds anything else)",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: continue although settings differ from the run's config.yaml (the "
        "differences are recorded in config_changes.yaml)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``prism`` argument parser and its sub-commands."""
    parser = _Parser(
        prog="prism",
        description="PRISM: distil vision foundation models into a "
        "dual-stream conditioned-MoE ViT and recombine it for dense prediction.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("smoke", help="train a tiny student on a CPU for a few steps (checks an installation)")
    p.add_argument("--steps", type=_count(1), default=30)
    p.add_argument("--out", default="runs/smoke", help="run folder for the tiny student's training")
    p.add_argument("--seed", type=_count(0), default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a previous smoke run in --out")
    p.set_defaults(func=cmd_smoke)

    p = sub.add_parser(
        "demo",
        help="the whole method on rendered scenes on a CPU: tiny teachers, Stage 1, Stage 2, evaluation, "
        "analysis and a report (under 10 minutes; --quick under 1)",
    )
    p.add_argument("--quick", action="store_true", help="smaller and shorter (checks the pipeline)")
    p.add_argument("--out", default="runs/demo", help="folder for the data, runs, figures and report.md")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cache-dir", help="where the tiny teachers are cached (default: ~/.cache/prism_vfm/demo_teachers)"
    )
    p.add_argument(
        "--workers",
        type=int,
        help="trainings run side by side in this many one-thread processes (default: one per usable core)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "distill", help="Stage 1: distil the teachers into a student (torchrun for several GPUs)"
    )
    p.add_argument("--preset", default="LB", help="BB, BS, LB, LL (SPEC presets) or tiny (CPU, seconds)")
    p.add_argument("--data", help="image folder: ImageNet train layout or a flat folder")
    p.add_argument(
        "--teachers-dir", help="folder with the teachers' official weight files (default: the Hub)"
    )
    p.add_argument("--out", help="run folder (checkpoints, config.yaml, metrics.jsonl, tensorboard/)")
    p.add_argument("--config", help="YAML file of configuration keys (applied over the preset)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key, e.g. --set optim.lr=5e-4 (repeatable)",
    )
    _run_folder_arguments(p)
    p.add_argument("--ablation", help="an ablation variant, e.g. wo_anchor, dense, top1 (prism sweep --list)")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("finetune", help="Stage 2: multi-task fine-tuning on PASCAL-Context or NYUD-v2")
    p.add_argument("--dataset", choices=["pascal", "nyud"])
    p.add_argument("--data", help="the PASCALContext/ or NYUDv2/ folder")
    p.add_argument(
        "--init", help="Stage-1 checkpoint: a save_pretrained/checkpoint folder or an official .pth"
    )
    p.add_argument("--out", help="run folder")
    p.add_argument("--preset", help="pascal, nyud or tiny (CPU, seconds)")
    p.add_argument("--config", help="YAML file of configuration keys")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key (repeatable)"
    )
    _run_folder_arguments(p)
    p.add_argument("--ablation", help="the Stage-1 run's ablation variant (its loss and teacher switches)")
    p.set_defaults(func=cmd_finetune)

    video = sub.add_parser("video", help="VidPrism: train and evaluate on video data sets")
    video_sub = video.add_subparsers(dest="video_command", required=True)
    p = video_sub.add_parser("train", help="train VidPrism (torchrun for several GPUs)")
    p.add_argument(
        "--preset",
        default="k400_vitb16",
        help="k400_vitb16, k400_vitl14, ucf101_vitb16, ucf101_vitl14, hmdb51_vitb16, hmdb51_vitl14 (the "
        "released configurations) or tiny (CPU, seconds)",
    )
    p.add_argument("--data", help="data set folder: videos/, train.txt, val.txt, labels.csv")
    p.add_argument("--init", help="a previous VidPrism to start from (run, folder or released .pt)")
    p.add_argument("--out", help="run folder (checkpoints, config.yaml, metrics.jsonl, tensorboard/)")
    p.add_argument("--config", help="YAML file of configuration keys (applied over the preset)")
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun, shard the frame tower over the processes (FSDP2, a unit per block) instead "
        "of DDP (the fsdp key)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the settings, the label CSV and the video lists (every video must exist), say what "
        "would run, and stop (nothing is built or written)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key (repeatable)"
    )
    _run_folder_arguments(p)
    p.set_defaults(func=cmd_video_train)

    p = video_sub.add_parser("evaluate", help="closed-set top-1 / top-5 over clips × crops views")
    p.add_argument("--checkpoint", required=True, help="a run, checkpoint folder or released .pt")
    p.add_argument("--data", help="data set folder: videos/, val.txt, labels.csv")
    p.add_argument("--list", help="video list to evaluate (default: DATA/val.txt)")
    p.add_argument("--labels", help="label CSV (default: DATA/labels.csv)")
    p.add_argument("--videos", help="folder the list's paths are relative to (default: DATA/videos)")
    p.add_argument("--dataset", help="registry name (k400, ucf101, hmdb51, ssv2)")
    p.add_argument("--out", help="folder for metrics.json, metrics.md, per_class.csv, confusion.png")
    p.add_argument("--frames", type=int, default=32, help="frames per clip (default 32)")
    p.add_argument("--size", type=int, default=224, help="frame side (default 224)")
    p.add_argument("--clips", type=int, default=1, help="clips per video (default 1)")
    p.add_argument("--crops", type=int, default=1, choices=[1, 3, 5, 10], help="crops per clip (default 1)")
    p.add_argument(
        "--average",
        choices=["logits", "softmax"],
        default="logits",
        help="average the views' logits then softmax (released) or their softmax scores",
    )
    p.add_argument(
        "--blend",
        default="hub",
        help="test-time blend 0.99 fine-tuned + 0.01 original CLIP: 'hub' (released, OpenAI's weights), a "
        "CLIP weight file, or 'none'",
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_video_evaluate)

    p = video_sub.add_parser(
        "zeroshot", help="zero-shot top-1 / top-5 by text similarity, per a protocol file"
    )
    p.add_argument("--checkpoint", required=True, help="a run, checkpoint folder or released .pt")
    p.add_argument(
        "--protocol",
        required=True,
        help="a shipped protocol (ucf101_3splits, hmdb51_3splits, k600_novel_3splits, half_classes) or a "
        "protocol YAML: splits, templates, frames, views",
    )
    p.add_argument("--root", help="data root the protocol's paths are relative to (shipped protocols)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a protocol key (frames=8)"
    )
    p.add_argument("--out", help="folder for metrics.json / metrics.md and each split's report")
    p.add_argument("--text-weights", default="hub", help="CLIP text tower weights: 'hub' or a file")
    p.add_argument("--blend", default="hub", help="test-time CLIP blend: 'hub', a file, or 'none'")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_video_zeroshot)

    p = video_sub.add_parser(
        "analyze",
        help="what a head's experts do: accuracy per group, read-out with one expert hidden, attention "
        "mass per token, linear probes of each expert, time-reversal flips",
    )
    p.add_argument("run", help="a head trained on cached features: its run or checkpoint folder")
    p.add_argument(
        "--features", required=True, help="features folder: <split>.safetensors, labels.csv, classes.csv"
    )
    p.add_argument("--split", default="test", help="split to analyse (default test; probes fit on train)")
    p.add_argument("--out", help="folder for analysis.json and the figures")
    p.set_defaults(func=cmd_video_analyze)

    p = video_sub.add_parser(
        "demo",
        help="VidPrism on rendered clips on a CPU: a tiny image-text model, baseline and VidPrism heads, "
        "evaluation, expert analyses and a report (under 10 minutes; --quick under 2)",
    )
    p.add_argument("--quick", action="store_true", help="smaller and shorter, one seed (checks the pipeline)")
    p.add_argument(
        "--out", default="runs/video_demo", help="folder for the data, runs, figures and report.md"
    )
    p.add_argument("--seed", type=int, default=0, help="data and first head seed (full: seeds N, N+1, N+2)")
    p.add_argument(
        "--cache-dir",
        help="where the image-text model is cached (default: ~/.cache/prism_vfm/demo_teachers)",
    )
    p.add_argument(
        "--finetune",
        action="store_true",
        help="also train VidPrism end to end on the videos, the image encoder fine-tuned at the released "
        "learning-rate ratio (slower)",
    )
    p.set_defaults(func=cmd_video_demo)

    for name, func, shots, what in (
        ("fewshot", cmd_video_fewshot, "2 4 8 16", "train and score K-shot lists: shots × seeds, mean ± std"),
        (
            "base2novel",
            cmd_video_base2novel,
            "16",
            "K-shot training on half of the classes, scored on them and (zero-shot) on the rest",
        ),
    ):
        p = video_sub.add_parser(name, help=what)
        p.add_argument("--data", help="data set folder: videos/, train.txt, val.txt, labels.csv")
        p.add_argument("--out", required=True, help="folder of the lists, runs, evaluations and report")
        default_shots = [int(k) for k in shots.split()]
        p.add_argument(
            "--shots",
            type=int,
            nargs="+" if name == "fewshot" else None,
            default=default_shots if name == "fewshot" else default_shots[0],
            help=f"videos per class (default {shots})",
        )
        p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="draws (default 0 1 2)")
        p.add_argument("--preset", default="k400_vitb16", help="training preset (see prism video train)")
        p.add_argument("--init", help="a previous VidPrism to start each run from (run, folder or .pt)")
        p.add_argument("--config", help="YAML file of training keys (applied over the preset)")
        p.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="override a training key"
        )
        p.add_argument("--frames", type=int, default=0, help="frames per clip to score (default: training's)")
        p.add_argument("--size", type=int, default=0, help="frame side to score (default: training's)")
        p.add_argument("--clips", type=int, default=1, help="clips per video (default 1)")
        p.add_argument("--crops", type=int, default=1, choices=[1, 3, 5, 10], help="crops per clip")
        p.add_argument("--average", choices=["logits", "softmax"], default="logits")
        p.add_argument("--blend", default="hub", help="test-time CLIP blend: 'hub', a file, or 'none'")
        p.add_argument("--text-weights", default="hub", help="CLIP text tower weights: 'hub' or a file")
        p.add_argument("--batch-size", type=int, default=4)
        p.add_argument("--workers", type=int, default=4)
        p.add_argument("--device", default="cpu")
        p.set_defaults(func=func)

    p = video_sub.add_parser(
        "k600-novel", help="draw the Kinetics-600 novel-class splits from your K400 and K600 label CSVs"
    )
    p.add_argument("--k400-labels", required=True, help="Kinetics-400 label CSV (id,name)")
    p.add_argument("--k600-labels", required=True, help="Kinetics-600 label CSV (id,name)")
    p.add_argument("--out", required=True, help="folder for split1-3.csv and the protocol (K600/k600_novel)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one numpy seed per split")
    p.add_argument("--per-split", type=int, default=160, help="classes per split (default 160)")
    p.add_argument(
        "--novel-count", type=int, default=220, help="novel classes expected (default 220; 0: any number)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace split files already in --out")
    p.set_defaults(func=cmd_video_k600_novel)

    p = sub.add_parser(
        "sweep", help="train ablation variants with shared settings and write one comparison table"
    )
    p.add_argument("--variants", help="comma-separated variant names, e.g. prism,dense,wo_anchor,top1")
    p.add_argument("--list", action="store_true", help="list the named variants and exit")
    p.add_argument("--out", help="sweep folder: one run folder per variant, comparison.md and .json")
    p.add_argument("--preset", default="LB", help="Stage-1 preset shared by all variants (tiny: CPU)")
    p.add_argument("--data", help="Stage-1 image folder")
    p.add_argument("--teachers-dir", help="folder with the teachers' official weight files (both stages)")
    p.add_argument("--config", help="Stage-1 YAML file of configuration keys")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Stage-1 override")
    p.add_argument("--dataset", choices=["pascal", "nyud"], help="Stage-2 data set (runs Stage 2)")
    p.add_argument("--stage2-data", help="the PASCALContext/ or NYUDv2/ folder (runs Stage 2)")
    p.add_argument("--stage2-preset", help="Stage-2 preset: pascal, nyud or tiny")
    p.add_argument("--stage2-config", help="Stage-2 YAML file of configuration keys")
    p.add_argument("--stage2-set", action="append", default=[], metavar="KEY=VALUE", help="Stage-2 override")
    p.add_argument("--split", default="val", help="evaluation split after Stage 2")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after Stage 2")
    p.add_argument("--baselines", help="JSON file {task: single-task score} for Δm")
    p.add_argument("--eval-workers", type=_count(0), help="processes for the boundary evaluation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="evaluation")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "evaluate", help="per-task metrics (odsF included, no MATLAB) and Δm of a multi-task model"
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="Stage-2 run or checkpoint folder, an official Stage-2 .pth, or a released tag "
        "(e.g. prism_vit_base_patch16_384.prism_stage2_pascal)",
    )
    p.add_argument("--dataset", required=True, choices=["pascal", "nyud"])
    p.add_argument("--data", required=True, help="the PASCALContext/ or NYUDv2/ folder")
    p.add_argument("--split", default="val")
    p.add_argument("--out", help="folder for metrics.json, metrics.md (and edge/ PNGs with --save-edges)")
    p.add_argument("--batch-size", type=_count(1), default=2)
    p.add_argument(
        "--workers", type=_count(0), help="processes for the boundary evaluation (default: all CPUs)"
    )
    p.add_argument(
        "--baselines",
        help="JSON file {task: single-task score} for Δm (default: the paper's, for the model's backbone)",
    )
    p.add_argument("--save-edges", action="store_true", help="write the edge maps as PNGs (what SEISM reads)")
    p.add_argument(
        "--matcher",
        choices=["fast", "maximum", "bsds"],
        default="fast",
        help="boundary matcher: the BSDS matcher's assignment computed fast (fast, default: the same counts, "
        "20-40x faster), SEISM's BSDS matcher itself (bsds, the reference) or a maximum matching "
        "(maximum: scores about 0.1 point higher)",
    )
    p.add_argument(
        "--img-size", type=_count(1), nargs=2, metavar=("H", "W"), help="input size (default: the data set's)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "analyze",
        help="how the experts self-organise: routing, coactivation, gradients, seeds, gates, efficiency",
    )
    p.add_argument(
        "analysis", choices=["routing", "coactivation", "gradients", "seeds", "gates", "efficiency"]
    )
    p.add_argument(
        "--checkpoint",
        nargs="+",
        required=True,
        help="run folder(s), checkpoint or save_pretrained folder(s), official .pth file(s) or released "
        "tags (prism_vit_base_patch16_384.prism_stage1); seeds: one "
        "per run, the first the reference; coactivation/gates: a run folder means all its checkpoints; "
        "efficiency: also prism_vit_* model names",
    )
    p.add_argument("--data", help="folder of images (e.g. a validation set or a JPEGImages folder)")
    p.add_argument("--out", help="folder for the PNG figures, JSON and Markdown (default analysis/<name>)")
    p.add_argument("--kind", choices=["teacher", "task"], help="context kind (default: task for Stage 2)")
    p.add_argument("--contexts", type=_count(0), nargs="+", help="context ids (default: all of the kind)")
    p.add_argument(
        "--images", type=_count(1), default=64, help="images analysed (the first, in sorted order)"
    )
    p.add_argument("--batch-size", type=_count(1))
    p.add_argument(
        "--img-size", type=_count(1), nargs=2, metavar=("H", "W"), help="rebuild for this input size"
    )
    p.add_argument("--threshold", type=float, help="coactivation: selection frequency (default top_k/E)")
    p.add_argument("--teachers", nargs="+", help="gradients: teacher names in id order (default: the run's)")
    p.add_argument("--teachers-dir", help="gradients: folder of teacher weight files (default: Hub)")
    p.add_argument("--no-latency", action="store_true", help="efficiency: skip the latency measurement")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("info", help="architecture and parameter counts of a student")
    p.add_argument(
        "model",
        help="prism_vit_* model name (optionally .tag), run, checkpoint or save_pretrained folder, "
        "or official .pth",
    )
    p.add_argument("--img-size", type=_count(1), nargs=2, metavar=("H", "W"))
    p.add_argument(
        "--step", type=_step, help="a run folder's checkpoint of this step, or 'best' (default: the latest)"
    )
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="official .pth → save_pretrained folder, or folder → official .pth")
    p.add_argument("source", help="official .pth, or a run, checkpoint or save_pretrained folder")
    p.add_argument("output")
    p.add_argument(
        "--step", type=_step, help="a run folder's checkpoint of this step, or 'best' (default: the latest)"
    )
    p.add_argument(
        "--img-size", type=_count(1), nargs=2, metavar=("H", "W"), help="resample pos_embed to this size"
    )
    p.set_defaults(func=cmd_convert)
    return parser


USER_ERRORS: tuple[type[BaseException], ...] = (PrismError, ValueError, KeyError, OSError)
"""What bad input raises (a project error, or validation's ValueError / KeyError / file errors): reported
as one line without a traceback. ``PRISM_DEBUG=1`` shows the traceback instead."""


def error_line(exc: BaseException) -> str:
    """``exc`` as the one line the command line prints: its message, or its type when it has none."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        message = exc.args[0]  # str(KeyError) adds quotes
    elif isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        message = f"{exc.filename}: {exc.strerror}"
    else:
        message = str(exc)
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    return message or type(exc).__name__


DISTRIBUTED_COMMANDS = frozenset({"distill", "finetune", "evaluate", "sweep", "video"})
"""The commands that share their work among torchrun's processes (the others refuse to run under it)."""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``prism`` console command."""
    args = build_parser().parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in DISTRIBUTED_COMMANDS:
        # Every process would do the same work and write the same files.
        raise SystemExit(
            f"prism {args.command}: runs in one process; launch it without torchrun "
            f"(torchrun runs {', '.join(sorted(DISTRIBUTED_COMMANDS))})"
        )
    try:
        args.func(args)
        if torch.distributed.is_initialized():  # a torchrun process leaves its group before exiting
            from prism_vfm.train.distributed import shutdown_distributed

            shutdown_distributed()
    except USER_ERRORS as exc:
        if os.environ.get("PRISM_DEBUG", "") not in ("", "0"):
            raise
        print(f"prism: error: {error_line(exc)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])
