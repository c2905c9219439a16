"""Few-shot and base-to-novel protocols (VIDPRISM_SPEC §4), run through the project's one training loop
(:func:`~prism_vfm.video.train.train_video`), its closed-set evaluation and its zero-shot evaluation.

- **Few-shot**: for every number of shots K and seed, K videos per class of the training list
  (:func:`~prism_vfm.video.data.fewshot.k_shot`), trained with the given configuration and evaluated on the
  validation list; one table of shots × seeds with mean ± std.
- **Base-to-novel**: for every seed, half of the classes
  (:func:`~prism_vfm.video.data.classes.half_classes`) are base, the rest novel. K-shot (16) training on
  the base classes, then top-1 on the base classes' validation videos (the trained classifier) and on the
  novel classes' (text similarity, as zero-shot); their harmonic mean per seed, and mean ± std.

Everything goes under one folder: ``lists/`` (the drawn lists and label CSVs), ``runs/<name>/`` (training
runs), ``evals/<name>/<checkpoint>/`` (reports) and the summary (``fewshot.md``/``.json``,
``base2novel.md``/``.json``). Running the command again reuses what is there: a finished run (its settings
checked against its ``config.yaml``), an unfinished one resumed, an evaluation of the same checkpoint (its
views checked); a drawn list is rewritten only to the same content. Nothing is overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from prism_vfm.config import ConfigError, to_dict
from prism_vfm.train.checkpoint import latest_checkpoint
from prism_vfm.train.distributed import barrier, is_main_process
from prism_vfm.train.run import RUN_CONTROL, config_differences
from prism_vfm.video.data.classes import half_classes, restrict
from prism_vfm.video.data.fewshot import harmonic_mean, k_shot
from prism_vfm.video.data.lists import (
    VideoSample,
    label_csv_text,
    read_label_csv,
    read_video_list,
    video_list_text,
)
from prism_vfm.video.evaluate import evaluate_video
from prism_vfm.video.model import RELEASED_BLEND_ALPHA
from prism_vfm.video.train import train_video
from prism_vfm.video.train_config import VideoTrainConfig, resolved, validate_video_train
from prism_vfm.video.zeroshot import zero_shot

FEW_SHOTS = (2, 4, 8, 16)
"""The shots of the released few-shot lists (VIDPRISM_SPEC §4)."""
BASE_TO_NOVEL_SHOTS = 16
SEEDS = (0, 1, 2)


@dataclass
class EvalSettings:
    """How each trained run is scored (``frames``/``size`` 0: the training's)."""

    frames: int = 0
    size: int = 0
    clips: int = 1
    crops: int = 1
    average: Literal["logits", "softmax"] = "logits"
    blend: str = "hub"
    text_weights: str = "hub"  # CLIP's text tower for the novel classes (base-to-novel)
    batch_size: int = 4
    workers: int = 4
    device: str = "cpu"


def _write_once(path: Path, text: str) -> None:
    """``text`` into ``path``; a file already there must hold the same (a rerun), else it is an error."""
    if path.exists():
        if path.read_bytes() != text.encode("utf-8"):
            raise FileExistsError(
                f"{path} exists with other content (another data set or draw?): choose another folder"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))


def _write_list(path: Path, samples: list[VideoSample]) -> Path:
    if is_main_process():
        _write_once(path, video_list_text(samples))
    return path


def _write_labels(path: Path, names: list[str]) -> Path:
    if is_main_process():
        _write_once(path, label_csv_text(names))
    return path


def _finished(run: Path, cfg: VideoTrainConfig) -> bool:
    """Whether ``run`` ended (it writes ``summary.json`` then) at the end of ``cfg``'s schedule or at its
    ``max_steps``, not at an earlier ``max_steps``."""
    if not (run / "summary.json").is_file():
        return False
    summary = json.loads((run / "summary.json").read_text())
    return summary["epochs"] >= cfg.epochs - 1e-9 or 0 < cfg.max_steps <= summary["steps"]


def train_or_reuse(cfg: VideoTrainConfig) -> Path:
    """The run of ``cfg``: reused when finished (its saved settings must equal ``cfg``'s), resumed when
    it has a checkpoint (its settings checked by the resume), else trained from the start."""
    run = Path(cfg.out)
    if _finished(run, cfg):
        saved = yaml.safe_load((run / "config.yaml").read_text()) or {}
        changes = {k: v for k, v in config_differences(saved, resolved(cfg)).items() if k not in RUN_CONTROL}
        if changes:
            listed = ", ".join(f"{k}: {old!r} → {new!r}" for k, (old, new) in sorted(changes.items()))
            raise ConfigError(
                f"{run} was trained with other settings ({listed}): restore them or choose another folder"
            )
        return run
    return train_video(cfg, resume=latest_checkpoint(run) is not None if run.is_dir() else False)


def _evaluate(
    run: Path,
    folder: Path,
    val_list: Path,
    labels: Path,
    cfg: VideoTrainConfig,
    settings: EvalSettings,
) -> dict[str, Any]:
    checkpoint = latest_checkpoint(run)
    assert checkpoint is not None  # a trained run has one
    out = folder / checkpoint.name
    d = cfg.data
    views = {
        "clips": settings.clips,
        "crops": settings.crops,
        "frames": settings.frames or d.num_frames,
        "size": settings.size or d.size,
    }
    done = _reusable(out, {"views": views, "average": settings.average, "blend": _blend_record(settings)})
    if done is not None:
        return done
    return evaluate_video(
        checkpoint,
        val_list,
        labels,
        d.videos,
        dataset=d.dataset,
        out=out,
        num_frames=settings.frames or d.num_frames,
        size=settings.size or d.size,
        test_clips=settings.clips,
        test_crops=settings.crops,
        average=settings.average,
        blend=settings.blend,
        batch_size=settings.batch_size,
        workers=settings.workers,
        decoder=d.decoder,
        device=settings.device,
    )


def _blend_record(settings: EvalSettings) -> Any:
    """The blend as evaluation reports record it."""
    return "none" if settings.blend == "none" else {"original": settings.blend, "alpha": RELEASED_BLEND_ALPHA}


def _reusable(out: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The report in ``out`` when there is one, made with the ``expected`` settings; another is an error."""
    if not (out / "metrics.json").is_file():
        return None
    done = json.loads((out / "metrics.json").read_text())
    other = {k: done.get(k) for k in expected if done.get(k) != expected[k]}
    if other:
        listed = ", ".join(f"{k}: {other[k]!r} → {expected[k]!r}" for k in other)
        raise ValueError(
            f"{out} was scored with other settings ({listed}): restore them or choose another --out"
        )
    return done


def _check_shots(samples: list[VideoSample], names: list[str], shots: int, where: str) -> None:
    counts = {c: 0 for c in range(len(names))}
    for s in samples:
        counts[s.label] += 1
    fewest = min(counts, key=lambda c: counts[c])
    if counts[fewest] < shots:
        raise ValueError(
            f"{where}: class {names[fewest]!r} has {counts[fewest]} training videos, fewer than {shots} shots"
        )


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def _data(cfg: VideoTrainConfig) -> tuple[VideoTrainConfig, list[str], list[VideoSample], list[VideoSample]]:
    cfg = resolved(cfg)
    validate_video_train(cfg)
    d = cfg.data
    if not d.val_list:
        raise ConfigError("data.val_list: expected the validation list the runs are scored on, got ''")
    names = read_label_csv(d.labels)
    train = read_video_list(d.train_list, len(names), root=d.videos, drop_short=True)
    val = read_video_list(d.val_list, len(names), root=d.videos)
    return cfg, names, train, val


def few_shot(
    cfg: VideoTrainConfig,
    out: str | Path,
    *,
    shots: Sequence[int] = FEW_SHOTS,
    seeds: Sequence[int] = SEEDS,
    settings: EvalSettings | None = None,
) -> dict[str, Any]:
    """Train and score ``cfg`` on K-shot lists of its training list, for every K of ``shots`` and every
    seed; the report (``fewshot.json``/``.md``) and every run and list go to ``out``."""
    settings = settings or EvalSettings()
    cfg, names, train, _ = _data(cfg)
    out = Path(out)
    for k in shots:
        _check_shots(train, names, k, cfg.data.train_list)
    table: dict[str, dict[str, float]] = {}
    for k in shots:
        for seed in seeds:
            name = f"{k}shot_seed{seed}"
            train_list = _write_list(out / "lists" / f"train_{name}.txt", k_shot(train, k, seed))
            barrier()
            run_cfg = dataclasses.replace(
                cfg,
                out=str(out / "runs" / name),
                data=dataclasses.replace(cfg.data, train_list=str(train_list)),
            )
            run = train_or_reuse(run_cfg)
            result = _evaluate(
                run, out / "evals" / name, Path(cfg.data.val_list), Path(cfg.data.labels), cfg, settings
            )
            table.setdefault(str(k), {})[str(seed)] = result["scores"]["top1"]
    summary = {
        "protocol": "few-shot",
        "shots": list(shots),
        "seeds": list(seeds),
        "train_list": cfg.data.train_list,
        "val_list": cfg.data.val_list,
        "labels": cfg.data.labels,
        "draw": "prism_vfm.video.data.fewshot.k_shot (numpy default_rng(seed), K videos per class)",
        "config": to_dict(cfg),
        "evaluation": dataclasses.asdict(settings),
        "top1": table,
        "top1_mean_std": {k: _mean_std(list(v.values())) for k, v in table.items()},
    }
    if is_main_process():
        _write_report(out / "fewshot", summary, _few_shot_table(summary))
    return summary


def _few_shot_table(summary: dict[str, Any]) -> list[str]:
    seeds = summary["seeds"]
    lines = [
        "# few-shot top-1 (%)",
        "",
        f"Training list {summary['train_list']}, K videos per class drawn per seed; scored on "
        f"{summary['val_list']}. Std over seeds: sample (n − 1).",
        "",
        "| shots | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
        "|---|" + "---|" * (len(seeds) + 1),
    ]
    for k in summary["shots"]:
        row, ms = summary["top1"][str(k)], summary["top1_mean_std"][str(k)]
        cells = " | ".join(f"{row[str(s)]:.2f}" for s in seeds)
        lines.append(f"| {k} | {cells} | {ms['mean']:.2f} ± {ms['std']:.2f} |")
    return lines


def base_to_novel(
    cfg: VideoTrainConfig,
    out: str | Path,
    *,
    shots: int = BASE_TO_NOVEL_SHOTS,
    seeds: Sequence[int] = SEEDS,
    settings: EvalSettings | None = None,
) -> dict[str, Any]:
    """For every seed: train ``cfg`` on ``shots`` videos per base class (half of the classes), score the
    base classes' validation videos with the classifier and the novel classes' by text similarity; the
    report (``base2novel.json``/``.md``) and every run and list go to ``out``."""
    settings = settings or EvalSettings()
    cfg, names, train, val = _data(cfg)
    out = Path(out)
    rows = []
    for seed in seeds:
        base = half_classes(len(names), seed)
        novel = [c for c in range(len(names)) if c not in base]
        base_names, novel_names = [names[c] for c in base], [names[c] for c in novel]
        base_train = restrict(train, base)
        _check_shots(base_train, base_names, shots, cfg.data.train_list)
        folder = out / "lists" / f"seed{seed}"
        labels = _write_labels(folder / "base_labels.csv", base_names)
        train_list = _write_list(folder / f"base_train_{shots}shot.txt", k_shot(base_train, shots, seed))
        val_list = _write_list(folder / "base_val.txt", restrict(val, base))
        protocol = folder / "novel_protocol.yaml"
        if is_main_process():
            _write_once(protocol, yaml.safe_dump(_novel_protocol(cfg, novel_names, seed, settings)))
        barrier()
        d = dataclasses.replace(
            cfg.data, train_list=str(train_list), val_list=str(val_list), labels=str(labels)
        )
        run_cfg = dataclasses.replace(cfg, out=str(out / "runs" / f"seed{seed}"), data=d)
        run = train_or_reuse(run_cfg)
        base_result = _evaluate(run, out / "evals" / f"seed{seed}" / "base", val_list, labels, cfg, settings)
        checkpoint = latest_checkpoint(run)
        assert checkpoint is not None
        novel_out = out / "evals" / f"seed{seed}" / "novel" / checkpoint.name
        novel_result = _reusable(novel_out, {"blend": _blend_record(settings)})
        if novel_result is None:  # its views are those of its protocol file, written once above
            novel_result = zero_shot(
                checkpoint,
                protocol,
                out=novel_out,
                text_weights=settings.text_weights,
                blend=settings.blend,
                batch_size=settings.batch_size,
                workers=settings.workers,
                device=settings.device,
            )
        b, n = base_result["scores"]["top1"], novel_result["top1"]["mean"]
        rows.append(
            {
                "seed": seed,
                "base_classes": base_names,
                "novel_classes": novel_names,
                "base": b,
                "novel": n,
                "harmonic_mean": harmonic_mean(b, n),
            }
        )
    summary = {
        "protocol": "base-to-novel",
        "shots": shots,
        "seeds": list(seeds),
        "train_list": cfg.data.train_list,
        "val_list": cfg.data.val_list,
        "labels": cfg.data.labels,
        "draw": "base: prism_vfm.video.data.classes.half_classes (np.random.RandomState(seed)); shots: "
        "prism_vfm.video.data.fewshot.k_shot with the same seed",
        "config": to_dict(cfg),
        "evaluation": dataclasses.asdict(settings),
        "seeds_results": rows,
        **{key: _mean_std([r[key] for r in rows]) for key in ("base", "novel", "harmonic_mean")},
    }
    if is_main_process():
        _write_report(out / "base2novel", summary, _base_to_novel_table(summary))
    return summary


def _novel_protocol(
    cfg: VideoTrainConfig, novel: list[str], seed: int, settings: EvalSettings
) -> dict[str, Any]:
    d = cfg.data
    return {
        "name": f"novel_seed{seed}",
        "videos": str(Path(d.videos).resolve()),
        "splits": [
            {
                "list": str(Path(d.val_list).resolve()),
                "labels": str(Path(d.labels).resolve()),
                "classes": novel,
            }
        ],
        "templates": "ensemble_28",
        "frames": settings.frames or d.num_frames,
        "size": settings.size or d.size,
        "clips": settings.clips,
        "crops": settings.crops,
        "average": settings.average,
        "dataset": d.dataset,
    }


def _base_to_novel_table(summary: dict[str, Any]) -> list[str]:
    lines = [
        "# base-to-novel top-1 (%)",
        "",
        f"{summary['shots']} shots per base class (half of the classes, drawn per seed) from "
        f"{summary['train_list']}; base scored by the classifier, novel by text similarity, on "
        f"{summary['val_list']}. HM: harmonic mean. Std over seeds: sample (n − 1).",
        "",
        "| seed | base | novel | HM |",
        "|---|---|---|---|",
        *(
            f"| {r['seed']} | {r['base']:.2f} | {r['novel']:.2f} | {r['harmonic_mean']:.2f} |"
            for r in summary["seeds_results"]
        ),
        "| mean ± std | "
        + " | ".join(
            f"{summary[k]['mean']:.2f} ± {summary[k]['std']:.2f}" for k in ("base", "novel", "harmonic_mean")
        )
        + " |",
    ]
    return lines


def _write_report(stem: Path, summary: dict[str, Any], lines: list[str]) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
