"""Train a list of variants with shared settings and write one comparison table.

Each variant runs through the same trainers as any other run: Stage 1 (``OUT/<variant>/stage1``), then,
when a Stage-2 configuration is given, Stage 2 from that variant's last Stage-1 checkpoint
(``OUT/<variant>/stage2``) and the evaluation on ``split`` (``OUT/<variant>/eval``). A variant's row is
written to ``OUT/<variant>/result.json`` when it is complete; a sweep started again skips complete variants
and resumes an interrupted run from its last checkpoint. After every variant ``OUT/comparison.json`` and
``OUT/comparison.md`` are rewritten with all rows so far: per-task headline metrics and Δm (with Stage 2),
backbone parameters, active parameters and GFLOPs of the Stage-1 student at its input size.

Each variant's own settings (its Stage-1 and Stage-2 configurations after the ablation, the evaluation
split and baselines) are kept in ``OUT/<variant>/settings.json`` from its start. A sweep started again
with other settings for a variant that has begun stops before any training and lists the differences:
its results (or its half-trained run) belong to the old settings, and it is never retrained in place.
Use another ``OUT``, or delete the variant's folder to rerun it. Settings that cannot change a result
(``workers``, ``log_every``) are not compared.

Under torchrun every process trains and evaluates each variant; only rank 0 writes the sweep's files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from prism_vfm.ablation.variants import apply_ablation, describe
from prism_vfm.config import ConfigError, to_dict
from prism_vfm.data.registry import HEADLINE_METRICS
from prism_vfm.distill.config import Stage1Config
from prism_vfm.finetune.config import Stage2Config, resolved
from prism_vfm.train.checkpoint import latest_checkpoint
from prism_vfm.train.distributed import barrier, is_main_process

logger = logging.getLogger(__name__)


def run_sweep(
    variants: Sequence[str],
    stage1: Stage1Config,
    out: str | Path,
    stage2: Stage2Config | None = None,
    split: str | None = "val",
    baselines: Mapping[str, float] | None = None,
    eval_workers: int | None = None,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Run every variant (Stage 1, then Stage 2 and evaluation if ``stage2`` is given); returns the rows.

    ``stage1`` and ``stage2`` are the shared settings (their ``out``/``init`` are set per variant);
    ``split=None`` skips the evaluation. Every variant's configuration is checked before anything trains.
    """
    if not variants:
        raise ValueError("a sweep needs at least one variant")
    if len(set(variants)) != len(variants):
        raise ValueError(f"variants are listed twice: {list(variants)}")
    out = Path(out)
    for name in variants:  # fail on a bad name, impossible combination or changed settings before training
        apply_ablation(stage1, name)
        if stage2 is not None:
            apply_ablation(stage2, name)
        current = variant_settings(name, stage1, out / name, stage2, split, baselines)
        check_variant_settings(out / name, current)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
    settings = {"stage1": to_dict(stage1), "stage2": to_dict(stage2) if stage2 is not None else None}
    rows: list[dict[str, Any]] = []
    for name in variants:
        rows.append(_run_variant(name, stage1, out / name, stage2, split, baselines, eval_workers, device))
        if is_main_process():
            write_comparison(out, rows, settings)
    barrier()  # the table is written before any process returns
    return rows


UNCOMPARED_KEYS = frozenset({"workers", "log_every"})
"""Configuration keys that cannot change a variant's result, left out of its settings."""


def variant_settings(
    name: str,
    stage1: Stage1Config,
    vdir: Path,
    stage2: Stage2Config | None,
    split: str | None,
    baselines: Mapping[str, float] | None,
) -> dict[str, Any]:
    """What a variant's result depends on: both stages' configurations after its ablation (Stage 2's
    ``init``, this variant's own Stage-1 checkpoint, left out), the evaluation split and baselines."""

    def plain(cfg: Any) -> dict[str, Any]:
        return {k: v for k, v in to_dict(cfg).items() if k not in UNCOMPARED_KEYS | {"init"}}

    cfg1 = apply_ablation(dataclasses.replace(stage1, out=str(vdir / "stage1")), name)
    cfg2 = None
    if stage2 is not None:
        cfg2 = plain(apply_ablation(dataclasses.replace(stage2, out=str(vdir / "stage2")), name))
    evaluation = {"split": split, "baselines": dict(baselines) if baselines is not None else None}
    return {"stage1": plain(cfg1), "stage2": cfg2, "evaluation": evaluation if stage2 is not None else None}


def settings_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """``key: saved → current`` for every nested key whose value differs (added or removed keys too)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in sorted(saved.keys() | current.keys(), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved:
                out.append(f"{where}: (absent) → {current[key]!r}")
            elif key not in current:
                out.append(f"{where}: {saved[key]!r} → (absent)")
            else:
                out += settings_differences(saved[key], current[key], where)
        return out
    return [] if saved == current else [f"{prefix}: {saved!r} → {current!r}"]


def check_variant_settings(vdir: Path, settings: Mapping[str, Any]) -> None:
    """Raise a ``ConfigError`` listing the differences when ``vdir`` was started with other settings."""
    path = vdir / "settings.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        # JSON has lists where the configurations have tuples: compare both as JSON.
        differences = settings_differences(saved, json.loads(json.dumps(settings)))
        if differences:
            raise ConfigError(
                f"sweep variant {vdir.name} in {vdir} was run with other settings ("
                + "; ".join(differences)
                + "): use another sweep folder, or delete the variant's folder to rerun it"
            )
    elif vdir.exists() and any(vdir.iterdir()):
        raise ConfigError(
            f"sweep variant folder {vdir} holds files but no settings.json, so its settings are unknown: "
            "use another sweep folder, or delete the variant's folder to rerun it"
        )


def _run_variant(
    name: str,
    stage1: Stage1Config,
    vdir: Path,
    stage2: Stage2Config | None,
    split: str | None,
    baselines: Mapping[str, float] | None,
    eval_workers: int | None,
    device: str,
) -> dict[str, Any]:
    from prism_vfm.distill.trainer import train_stage1
    from prism_vfm.models.prism_vit import PrismViT

    done = vdir / "result.json"
    if done.is_file():
        logger.info("%s: complete, not retrained", name)
        return json.loads(done.read_text())
    if is_main_process():
        vdir.mkdir(parents=True, exist_ok=True)
        settings = variant_settings(name, stage1, vdir, stage2, split, baselines)
        (vdir / "settings.json").write_text(json.dumps(settings, indent=2))
    barrier()
    cfg1 = apply_ablation(dataclasses.replace(stage1, out=str(vdir / "stage1")), name)
    ckpt1 = _train(train_stage1, cfg1, vdir / "stage1")
    row: dict[str, Any] = {"variant": name, "description": describe(name), "stage1": str(ckpt1)}
    row.update(model_cost(PrismViT.from_pretrained(ckpt1), cfg1.student.img_size))
    if stage2 is not None:
        from prism_vfm.evaluate import evaluate
        from prism_vfm.finetune.trainer import train_stage2

        cfg2 = apply_ablation(dataclasses.replace(stage2, init=str(ckpt1), out=str(vdir / "stage2")), name)
        ckpt2 = _train(train_stage2, cfg2, vdir / "stage2")
        row["stage2"] = str(ckpt2)
        if split:
            result = evaluate(
                ckpt2,
                cfg2.dataset,
                cfg2.data,
                split=split,
                out=vdir / "eval",
                workers=eval_workers,
                baselines=baselines,
                device=device,
                img_size=cast(tuple[int, int], tuple(resolved(cfg2).img_size)),  # (H, W)
            )
            row["scores"] = {t: s[HEADLINE_METRICS[t]] for t, s in result["scores"].items()}
            row["delta_m"] = result["delta_m"]
    if is_main_process():
        done.write_text(json.dumps(row, indent=2))
    return row


def _train(train: Callable[..., Path], cfg: Any, run: Path) -> Path:
    """Train (resuming an interrupted run) unless the run finished before; the last checkpoint."""
    finished = run / "finished"
    if not finished.is_file():
        resume = latest_checkpoint(run) is not None
        # A run killed before its first checkpoint restarts; the trainer ends with a barrier.
        train(cfg, resume=resume, overwrite=not resume)
        if is_main_process():
            finished.write_text("")
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"{run} finished without a checkpoint")
    return ckpt


def model_cost(model: Any, img_size: int | Sequence[int]) -> dict[str, Any]:
    """Backbone parameters, active parameters and analytic GFLOPs per image at ``img_size``."""
    from prism_vfm.analysis.efficiency import efficiency

    e = efficiency(model, img_size, latency=False)
    return {
        "params": e["params_backbone"],
        "active_params": e["params_active"],
        "gflops": e["gflops"],
        "img_size": e["img_size"],
    }


def write_comparison(out: Path, rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> None:
    """``comparison.json`` (settings and rows) and ``comparison.md`` (one table) in ``out``."""
    (out / "comparison.json").write_text(json.dumps({"settings": settings, "rows": list(rows)}, indent=2))
    (out / "comparison.md").write_text(comparison_table(rows))


def comparison_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: variant, per-task headline metrics, Δm, parameters (M), active parameters (M), GFLOPs."""
    tasks: list[str] = []
    for r in rows:
        tasks += [t for t in r.get("scores", {}) if t not in tasks]
    has_dm = any("delta_m" in r for r in rows)
    head = ["variant", *(f"{t} ({HEADLINE_METRICS[t]})" for t in tasks)]
    head += ["Δm"] if has_dm else []
    head += ["params (M)", "active (M)", "GFLOPs"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r in rows:
        scores = r.get("scores", {})
        cells = [r["variant"], *(f"{scores[t]:.2f}" if t in scores else "–" for t in tasks)]
        cells += [f"{r['delta_m']:.2f}" if "delta_m" in r else "–"] if has_dm else []
        cells += [f"{r['params'] / 1e6:.2f}", f"{r['active_params'] / 1e6:.2f}", f"{r['gflops']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    size = rows[0].get("img_size") if rows else None
    note = f"\nParameters and GFLOPs: backbone, per image at {size[0]}×{size[1]}.\n" if size else ""
    return "\n".join(lines) + "\n" + note
