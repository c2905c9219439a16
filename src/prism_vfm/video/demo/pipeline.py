"""``prism video demo``: VidPrism transferring an image-text model to video, on a laptop CPU, no downloads.

data (rendered clips in the released list layout) → a tiny image-text model (trained once on captioned
frames, cached) → frozen frame features of every clip and text embeddings of every class name → runs (each
head trained by ``prism video train`` on the cached features: mean pooling, a temporal transformer, the
homogeneous-expert control, VidPrism as released, with the summed DBI and the inter-expert diversity, and
without DBI; the image-only zero-shot classifier needs no training) → evaluation on the test clips →
analyses of the experts (``prism video analyze``) → ``report.md`` with figures, ``summary.json`` with the
time of every stage.

The full demo trains every head with three seeds (the data stay those of ``--seed``); ``--quick`` one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prism_vfm.models.load import load
from prism_vfm.utils.io import atomic_save_safetensors, prepare_marked_output
from prism_vfm.video.analysis import accuracy_by_group, collect, pair_accuracy
from prism_vfm.video.data.features import read_feature_set, write_feature_set
from prism_vfm.video.demo import clips as demo_clips
from prism_vfm.video.demo.clips import DemoDataset
from prism_vfm.video.expert_report import ClassTable, analyse_head, read_class_table, write_class_table
from prism_vfm.video.feature_model import FeatureClassifier
from prism_vfm.video.train import read_class_text, train_video
from prism_vfm.video.train_config import VideoDataConfig, VideoModelConfig, VideoTrainConfig


@dataclass(frozen=True)
class RunSpec:
    """One head of the comparison: its label in the report and its ``model.*`` training options."""

    label: str
    model: dict[str, Any] | None  # None: not trained (the image-only zero-shot classifier)


RUNS: dict[str, RunSpec] = {
    "image_zero_shot": RunSpec("(a) image-only zero-shot", None),
    "mean_pool": RunSpec("(b) mean pool + projection", {"head": "mean_pool"}),
    "temporal_transformer": RunSpec("(c) temporal transformer", {"head": "temporal_transformer"}),
    "homogeneous": RunSpec("(d) homogeneous experts", {"shared_stream": 0}),
    "vidprism": RunSpec("(e) VidPrism (released)", {}),
    "vidprism_sum_div": RunSpec(
        "(f) VidPrism, summed DBI + inter-expert diversity",
        {"dbi_update": "sum", "diversity": "inter_expert"},
    ),
    "vidprism_no_dbi": RunSpec("(g) VidPrism without DBI", {"dbi": False}),
}
"""The heads the demo compares, in report order."""

EXPERT_RUNS = ("homogeneous", "vidprism", "vidprism_sum_div", "vidprism_no_dbi")
"""The runs with VidPrism's experts, whose specialisation is analysed."""

OUTPUTS = ("data", "features", "runs", "figures", "report.md", "summary.json")
"""What a video demo writes under its output folder (replaced when a video demo runs there again)."""

MARKER = ".prism_video_demo"
"""The file that marks a folder as a video demo's output: only then are its ``OUTPUTS`` replaced."""


@dataclass
class VideoDemoConfig:
    """Sizes and lengths of every stage."""

    train_per_class: int = 16
    val_per_class: int = 0
    test_per_class: int = 8
    seeds: int = 3  # head seeds: --seed, --seed + 1, ...
    epochs: int = 12
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    examples: int = 6  # test clips shown as frame strips
    quick: bool = False  # sizes that check the pipeline, not the method
    finetune_epochs: int = 0  # > 0: also VidPrism trained end to end, the image encoder fine-tuned


def video_demo_config(quick: bool = False, finetune: bool = False) -> VideoDemoConfig:
    """The full demo (under ten minutes on two CPU cores) or the ``quick`` one (under two; for tests)."""
    if quick:
        return VideoDemoConfig(
            train_per_class=3,
            test_per_class=1,
            seeds=1,
            epochs=2,
            batch_size=16,
            examples=3,
            quick=True,
            finetune_epochs=1 if finetune else 0,
        )
    return VideoDemoConfig(finetune_epochs=6 if finetune else 0)


def prepare_output(out: Path) -> None:
    """Make ``out`` ready: a previous demo's outputs are removed, nothing else is touched
    (see :func:`prism_vfm.utils.io.prepare_marked_output`)."""
    prepare_marked_output(out, OUTPUTS, MARKER, "prism video demo")


@dataclass
class VideoDemoResult:
    """Where everything went and the numbers."""

    out: Path
    report: Path
    results: dict[str, Any]
    timings: dict[str, float]
    headline: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)


@contextlib.contextmanager
def _stage(timings: dict[str, float], name: str) -> Iterator[None]:
    print(f"[video demo] {name}", flush=True)
    tic = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - tic


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # The heads' operations on cached features are small: with several threads, synchronisation costs
    # more than it saves (about 20 times slower on two busy cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ classes
def class_table(classes: list[tuple[str, str]]) -> tuple[ClassTable, dict[int, int]]:
    """The class table of (shape, motion) classes (group = the motion's group, partner = the same shape's
    time-reversed motion) and the blink partners (the same shape blinking at the other rate)."""
    group_of = {m: g for g, motions in demo_clips.MOTION_GROUPS.items() for m in motions}
    reverse = {a: b for pair in demo_clips.REVERSAL_PAIRS for a, b in (pair, pair[::-1])}
    quick, slow = demo_clips.BLINK_PAIR
    blink = {quick: slow, slow: quick}
    index = {c: i for i, c in enumerate(classes)}
    names = [demo_clips.class_name(s, m) for s, m in classes]

    def partners(other: dict[str, str]) -> dict[int, int]:
        return {
            i: index[(s, other[m])]
            for i, (s, m) in enumerate(classes)
            if m in other and (s, other[m]) in index
        }

    table = ClassTable(
        names,
        [group_of[m] for _, m in classes],
        partners(reverse),
        {"motion": [m for _, m in classes], "shape": [s for s, _ in classes]},
    )
    return table, partners(blink)


def image_zero_shot_logits(features: Tensor, class_text: Tensor) -> Tensor:
    """The image model's own classifier for a clip: cos(mean frame embedding, class text embedding)."""
    return F.normalize(features.mean(1), dim=-1) @ F.normalize(class_text, dim=-1).t()


# --------------------------------------------------------------------------------------------- runs
def head_config(
    cfg: VideoDemoConfig, features: Path, out: Path, spec: dict[str, Any], seed: int
) -> VideoTrainConfig:
    """``prism video train`` on the cached features with the demo's schedule; ``spec`` are ``model.*``."""
    return VideoTrainConfig(
        out=str(out),
        data=VideoDataConfig(dataset="ucf101", features=str(features), workers=0),
        model=VideoModelConfig(tower="tiny", pretrained=False, grad_checkpointing=False, **spec),
        epochs=cfg.epochs,
        warmup_epochs=min(1.0, cfg.epochs / 4),
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        clip_ratio=1.0,
        weight_decay=cfg.weight_decay,
        lr_every=1,
        amp="fp32",
        seed=seed,
        val_every=0,
        keep_last=1,
        log_every=50,
    )


def evaluate_logits(
    logits: Tensor, labels: Tensor, table: ClassTable, blink: dict[int, int]
) -> dict[str, Any]:
    """Every score of one head on the test clips (percentages)."""
    pred = logits.argmax(1)
    motion = accuracy_by_group(pred, labels, table.group, table.attributes["motion"])
    return {
        "top1": accuracy_by_group(pred, labels, table.group)["all"],
        "motion": motion["all"],
        "shape": accuracy_by_group(pred, labels, table.group, table.attributes["shape"])["all"],
        "motion_by_group": {g: v for g, v in motion.items() if g != "all"},
        "reversal_pairs": pair_accuracy(logits, labels, table.partner)["accuracy"],
        "blink_pair": pair_accuracy(logits, labels, blink)["accuracy"],
    }


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    t = torch.tensor(values, dtype=torch.float64)
    sd = float(t.std()) if len(values) > 1 else 0.0
    return {"mean": float(t.mean()), "sd": sd, "min": float(t.min()), "max": float(t.max()), "n": len(values)}


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Scores over seeds: every number → its :func:`spread` (nested dicts kept)."""
    first = per_seed[0]
    result: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, dict):
            result[key] = aggregate([s[key] for s in per_seed])
        elif isinstance(value, (int, float)):
            result[key] = spread([float(s[key]) for s in per_seed])
    return result


def train_and_evaluate(
    cfg: VideoDemoConfig, features: Path, runs_dir: Path, seeds: list[int], timings: dict[str, float]
) -> dict[str, Any]:
    """Train every head of :data:`RUNS` with every seed, score it on the test clips and analyse the
    experts' runs; returns ``{run: {"seeds": [...], "mean": aggregate, "analysis": [...]}}``."""
    table = read_class_table(features)
    _, blink = class_table(_classes_of(table))
    x, labels = read_feature_set(features / "test.safetensors", len(table.names))
    class_text = read_class_text(features / "class_text.safetensors", len(table.names))
    results: dict[str, Any] = {}
    for name, spec in RUNS.items():
        tic = time.perf_counter()
        per_seed, analyses, predictions = [], [], []
        if spec.model is None:
            logits = image_zero_shot_logits(x, class_text)
            per_seed.append(evaluate_logits(logits, labels, table, blink))
            predictions.append(logits.argmax(1).tolist())
        else:
            for seed in seeds:
                out = runs_dir / name / f"seed{seed}"
                run = train_video(head_config(cfg, features, out, spec.model, seed))
                model, _ = load(run)
                assert isinstance(model, FeatureClassifier)
                logits = collect(model, x).logits
                per_seed.append(evaluate_logits(logits, labels, table, blink))
                predictions.append(logits.argmax(1).tolist())
                if name in EXPERT_RUNS:
                    analyses.append(analyse_head(model, features, "test", out / "analysis"))
                else:
                    analyses.append(analyse_head(model, features, "test"))
        results[name] = {
            "label": spec.label,
            "seeds": seeds if spec.model is not None else [],
            "per_seed": per_seed,
            "mean": aggregate(per_seed),
            "analysis": analyses,
            "labels": labels.tolist(),
            "predictions": predictions[0],
            "seconds": time.perf_counter() - tic,
        }
        timings[f"runs/{name}"] = results[name]["seconds"]
    return results


FINETUNED = "vidprism_finetuned"
FINETUNED_LABEL = "(e') VidPrism, image encoder fine-tuned"


def finetune_and_evaluate(
    cfg: VideoDemoConfig, dataset: DemoDataset, weights: Path, out: Path, seed: int, table: ClassTable
) -> dict[str, Any]:
    """VidPrism as released trained end to end on the videos: the demo image-text model's tower
    fine-tuned at the released learning-rate ratio (``clip_ratio`` 0.06) with the released augmentation,
    then scored on the test clips (one centre view) like the heads on cached features."""
    from torch.utils.data import DataLoader

    from prism_vfm.video.data.dataset import VideoDataset
    from prism_vfm.video.model import VidPrism

    tic = time.perf_counter()
    train_cfg = VideoTrainConfig(
        out=str(out),
        data=VideoDataConfig(
            dataset="ucf101",
            root=str(dataset.root),
            num_frames=demo_clips.NUM_FRAMES,
            size=demo_clips.FRAME_SIZE,
            scale_size=demo_clips.FRAME_SIZE + 4,
            workers=0,
        ),
        model=VideoModelConfig(
            tower="demo",
            pretrained=False,
            clip_weights=str(weights),
            grad_checkpointing=False,
            text_loss=False,
        ),
        epochs=cfg.finetune_epochs,
        warmup_epochs=min(1.0, cfg.finetune_epochs / 4),
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        clip_ratio=0.06,
        weight_decay=cfg.weight_decay,
        lr_every=1,
        amp="fp32",
        seed=seed,
        val_every=0,
        keep_last=1,
        log_every=10,
    )
    model, _ = load(train_video(train_cfg))
    assert isinstance(model, VidPrism)
    test = VideoDataset(
        dataset.video_root,
        dataset.samples["test"],
        "val",
        demo_clips.NUM_FRAMES,
        demo_clips.FRAME_SIZE,
        demo_clips.FRAME_SIZE,
    )
    logits, labels = [], []
    with torch.no_grad():
        for batch in DataLoader(test, batch_size=cfg.batch_size):
            logits.append(model(batch["video"]).logits)
            labels.append(batch["label"])
    _, blink = class_table(_classes_of(table))
    scores = evaluate_logits(torch.cat(logits), torch.cat(labels), table, blink)
    return {
        "label": FINETUNED_LABEL,
        "seeds": [seed],
        "per_seed": [scores],
        "mean": aggregate([scores]),
        "analysis": [],
        "labels": torch.cat(labels).tolist(),
        "predictions": torch.cat(logits).argmax(1).tolist(),
        "seconds": time.perf_counter() - tic,
    }


def _classes_of(table: ClassTable) -> list[tuple[str, str]]:
    return list(zip(table.attributes["shape"], table.attributes["motion"], strict=True))


def write_features(
    folder: Path, splits: dict[str, tuple[Tensor, Tensor]], class_text: Tensor, table: ClassTable
) -> Path:
    """A features folder (:mod:`prism_vfm.video.data.features`) with ``classes.csv`` for the analyses."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, (x, y) in splits.items():
        write_feature_set(folder / f"{split}.safetensors", x, y)
    atomic_save_safetensors({"class_text": class_text.float().cpu()}, folder / "class_text.safetensors")
    (folder / "labels.csv").write_text(
        "id,name\n" + "".join(f"{i},{n}\n" for i, n in enumerate(table.names)), encoding="utf-8"
    )
    write_class_table(folder, table)
    return folder


# --------------------------------------------------------------------------------------- the demo
def run_video_demo(
    out: str | Path = "runs/video_demo",
    quick: bool = False,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    finetune: bool = False,
    config: VideoDemoConfig | None = None,
) -> VideoDemoResult:
    """Run the whole video demo into ``out``; returns where the report is and every number.

    The image-text model is cached in ``cache_dir`` (default: the PRISM demo's teacher cache,
    ``~/.cache/prism_vfm/demo_teachers``)."""
    from prism_vfm.video.demo.features import encode_demo_dataset
    from prism_vfm.video.demo.report import write_report

    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    cfg = config or video_demo_config(quick, finetune)
    out = Path(out)
    prepare_output(out)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with _stage(timings, "data"):
        dataset = demo_clips.write_demo_dataset(
            out / "data",
            train_per_class=cfg.train_per_class,
            val_per_class=max(cfg.val_per_class, 1),
            test_per_class=cfg.test_per_class,
            zeroshot_per_class=1,
            seed=seed,
        )
    table, _ = class_table(dataset.splits.video_classes)
    with _stage(timings, "image-text model"):
        from prism_vfm.video.demo.features import prepare_image_text

        image_text = prepare_image_text(cache_dir, quick=cfg.quick, seed=seed)
    with _stage(timings, "frame features"):
        splits, class_text = encode_demo_dataset(image_text, dataset, ("train", "test"))
        features = write_features(out / "features", splits, class_text, table)
    seeds = [seed + i for i in range(cfg.seeds)]
    with _stage(timings, "runs and evaluation"), _one_thread():
        results = train_and_evaluate(cfg, features, out / "runs", seeds, timings)
    if cfg.finetune_epochs:
        with _stage(timings, "fine-tuned encoder run"):
            results[FINETUNED] = finetune_and_evaluate(
                cfg, dataset, image_text, out / "runs" / FINETUNED / f"seed{seed}", seed, table
            )
    with _stage(timings, "report"):
        figures = write_report(out, cfg, dataset, results, table, timings, seeds)
    timings["total"] = time.perf_counter() - start
    headline = {
        name: {k: round(r["mean"][k]["mean"], 1) for k in ("top1", "motion", "reversal_pairs", "blink_pair")}
        for name, r in results.items()
    }
    summary = {
        "config": dataclasses.asdict(cfg),
        "seed": seed,
        "head_seeds": seeds,
        "timings_s": timings,
        "results": {
            k: {kk: vv for kk, vv in v.items() if kk not in ("analysis", "labels", "predictions")}
            for k, v in results.items()
        },
        "analysis": {k: v["analysis"] for k, v in results.items() if v["analysis"]},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    # the report carries the total too: rewrite its timing line now that it is known
    from prism_vfm.video.demo.report import write_markdown

    write_markdown(out, cfg, dataset, results, table, timings, seeds, figures)
    return VideoDemoResult(out, out / "report.md", results, timings, headline, figures)
