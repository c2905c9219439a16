"""``prism demo``: the whole method on rendered scenes, on a laptop CPU, with no downloads.

data (rendered scenes in the release layouts) → three tiny teachers (pretrained once, cached) → Stage 1
(distil them into a tiny PRISM student; three seeds, each also with shuffled teacher contexts as the
control for expert specialisation) → Stage 2 (multi-task fine-tuning on the PASCAL-Context layout; short
runs over three seeds with task contexts and with shuffled ones; one single-task run per task as the Δm
baselines) → evaluation (every metric, odsF included) → analysis (routing affinity and λ per layer) → a
Markdown report with figures.

Every stage is the library's own code path (``train_stage1``, ``train_stage2``, ``evaluate``,
``prism_vfm.analysis``); only the sizes are small.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, cast

from prism_vfm.data.registry import HEADLINE_METRICS, dataset_tasks
from prism_vfm.data.scene_sets import write_scene_images, write_scene_nyud, write_scene_pascal
from prism_vfm.demo.teachers import (
    DEMO_TEACHERS,
    DemoTeacherConfig,
    prepare_teachers,
    teacher_jobs,
    teacher_probe,
)
from prism_vfm.distill.config import OptimConfig, Stage1Config, StudentConfig, TeacherConfig
from prism_vfm.finetune.config import DistillConfig, Stage2Config
from prism_vfm.train.checkpoint import latest_checkpoint
from prism_vfm.utils.io import prepare_marked_output
from prism_vfm.utils.parallel import Job, critical_path, run_jobs, usable_cores

DATASET: Final = "pascalcontext"
OUTPUTS = (
    *("data", "stage1", "stage2", "stage2_routing", "single_task", "eval", "figures"),
    *("report.md", "analysis.json", "summary.json"),
)
"""What a demo writes under its output folder (replaced when a demo runs there again)."""

CONTROL: Final = "shuffled"
"""The name of the control runs, whose routers are given random context ids."""

MARKER = ".prism_demo"
"""The file that marks a folder as a demo's output: only then are its ``OUTPUTS`` replaced."""


def prepare_output(out: Path) -> None:
    """Make ``out`` ready: a previous demo's outputs are removed, nothing else is touched
    (see :func:`prism_vfm.utils.io.prepare_marked_output`)."""
    prepare_marked_output(out, OUTPUTS, MARKER, "prism demo")


@dataclass
class DemoConfig:
    """Sizes and lengths of every stage of the demo."""

    img_size: int = 64
    # Focal length in image widths (``render_scene``): 1.6 frames the objects closer than 1.0, so bottles,
    # plants and limbs cover more than a patch or two at 64 pixels (benchmarks/README.md, "prism demo").
    zoom: float = 1.6
    # Patch 4 gives a 16×16 token grid: boundaries, parts and thin objects need it more than width.
    patch_size: int = 4
    stage1_images: int = 512
    stage1_steps: int = 80
    stage1_batch: int = 12
    stage1_lr: float = 2e-3
    routing_seeds: int = 3  # Stage-1 and short Stage-2 runs per kind of context (own / shuffled)
    train_images: int = 320  # PASCAL-Context layout, train split (Stage 2)
    val_images: int = 32  # its val split (evaluation)
    nyud_images: int = 16  # the NYUD-v2 layout is written too, for `prism finetune --dataset nyud`
    # Many small steps: at the same CPU time, 2400 steps of batch 2 beat 600 of batch 8 on every task; 1900
    # keep the whole demo near eight minutes on two idle cores, with room for a slower machine within ten
    # (benchmarks/README.md, "prism demo").
    stage2_steps: int = 1900
    stage2_batch: int = 2
    stage2_lr: float = 1.5e-3
    # Stage-2 augmentation (``Stage2Config.scale_range`` / ``photometric``; released (0.5, 2.0) and on) and
    # the distillation regulariser of the multi-task run (released: on). The demo's val scenes are framed
    # like its train scenes, and in its budget rescaling and colour jitter cost more than they give;
    # without distillation a step costs about 15 % less.
    stage2_scale_range: tuple[float, float] = (1.0, 1.0)
    stage2_photometric: bool = False
    stage2_distill: bool = False
    # The losses of the runs scored against the targets (the multi-task run and its single-task baselines;
    # ``Stage2Config.loss_weights`` / ``class_balance``, released: the data set's weights and a plain
    # cross-entropy): mIoU over the scenes' classes is held down by the small ones (bottles, plants, TVs),
    # which a plain cross-entropy over a few thousand steps barely learns, and the sub-pixel edge head
    # learns exact boundary pixels faster with the edge loss weighted 200 instead of 50 (benchmarks/README.md,
    # "prism demo").
    stage2_loss_weights: dict[str, float] = field(default_factory=lambda: {"semseg": 3.0, "edge": 200.0})
    stage2_class_balance: dict[str, float] = field(default_factory=lambda: {"semseg": 0.5})
    # Boundaries in those runs. At 64 px the evaluation matches within 0.68 px, so only exact pixels count:
    # the edge head predicts every pixel of its output cells (``Stage2Config.subpixel_heads``; released: its
    # logits upsampled bilinearly, which keeps an edge near the cell centres) and learns the boundaries the
    # evaluation matches against (``edge_label``; released: the Laplacian's label, a pixel off half the time).
    stage2_subpixel_heads: tuple[str, ...] = ("edge",)
    stage2_edge_label: Literal["released", "evaluation"] = "evaluation"
    routing_steps: int = 30  # the short Stage-2 runs that test expert specialisation by task
    routing_batch: int = 8
    single_task_steps: int = 120  # each single-task baseline (Δm)
    single_task_batch: int = 8
    single_task_distill: bool = False  # baselines without the distillation regulariser: 3× cheaper
    width: int = 64
    depth: int = 6
    moe_layers: tuple[int, ...] = (1, 3, 5)
    num_experts: int = 8
    top_k: int = 2
    teachers: DemoTeacherConfig = field(default_factory=DemoTeacherConfig)
    # The student's routing (PrismViT arguments; defaults as released) and the learning-rate multiplier of
    # its routers and context tables in Stage 1 (``optim.router_lr_scale``) and in the short Stage-2 runs
    # (``router_lr_scale``): what expert specialisation in a short run from random weights depends on.
    # Released: experts copied from the anchor MLP, expert dropout 0.1, noisy gating, λ bias 2 and routers at
    # the base rate; from random weights in a few hundred steps that leaves every context on the same experts
    # (benchmarks/README.md, "prism demo"), so the demo starts its experts apart and lets the routers move.
    expert_init: str = "random"
    expert_dropout: float = 0.0
    noisy_gating: bool = False
    lambda_bias_init: float = 0.0
    # The teacher and task tables start ten times closer than released (0.02): the control runs' random
    # contexts then start nearly alike and stay so, while the runs given real contexts pull theirs apart.
    context_init_std: float = 0.002
    router_lr_scale: float = 10.0
    # The short Stage-2 runs' routers at five times the base rate: faster, and the control runs' random task
    # rows drift apart by noise alone and route by it (at ×15–20 as much as the runs given real tasks).
    routing_router_lr_scale: float = 5.0
    # The short Stage-2 runs with the distillation regulariser (as released) or without: without, a step
    # costs about half as much, and the teacher pass no longer pulls on the routers the task passes train.
    routing_distill: bool = False

    def seeds(self, seed: int) -> list[int]:
        """The seeds of the specialisation runs: the demo's seed first."""
        return [seed + i for i in range(self.routing_seeds)]


def demo_config(quick: bool = False, seed: int = 0) -> DemoConfig:
    """The full demo (under ten minutes on two CPU cores) or the ``quick`` one (seconds; for tests)."""
    if not quick:
        return DemoConfig(teachers=DemoTeacherConfig(steps=300, seed=seed))
    return DemoConfig(
        patch_size=8,
        stage1_images=48,
        stage1_steps=8,
        stage1_batch=6,
        routing_seeds=2,
        train_images=24,
        val_images=4,
        nyud_images=4,
        stage2_steps=120,
        stage2_batch=4,
        stage2_lr=2e-3,
        routing_steps=3,
        routing_batch=4,
        single_task_steps=4,
        single_task_batch=4,
        width=32,
        depth=4,
        moe_layers=(1, 2, 3),
        num_experts=4,
        teachers=DemoTeacherConfig(width=32, scenes=48, steps=20, batch_size=8, seed=seed),
    )


def default_cache_dir() -> Path:
    """Where the demo teachers are cached: ``$XDG_CACHE_HOME/prism_vfm/demo_teachers`` (``~/.cache`` by
    default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prism_vfm" / "demo_teachers"


def run_name(contexts: str, seed: int) -> str:
    """The folder of one specialisation run: ``seed<N>`` or ``seed<N>_shuffled``."""
    return f"seed{seed}" if contexts != CONTROL else f"seed{seed}_{CONTROL}"


def stage1_config(
    cfg: DemoConfig, data: Path, out: Path, weights: Path, seed: int, router_contexts: str = "assigned"
) -> Stage1Config:
    """Stage 1 as the presets run it, at demo size. The student starts from random weights, so its
    pretrained-parameter group learns at the full rate (the presets slow it for an ImageNet-initialised
    backbone). ``router_contexts="shuffled"`` is the control run."""
    epochs = cfg.stage1_steps * cfg.stage1_batch / cfg.stage1_images
    return Stage1Config(
        preset="demo",
        data=str(data),
        out=str(out),
        epochs=epochs,
        batch_size=cfg.stage1_batch,
        workers=0,
        seed=seed,
        amp="fp32",
        ckpt_every=cfg.stage1_steps,
        keep_last=1,
        log_every=10,
        student=StudentConfig(
            model="prism_vit_tiny_patch16_384",
            img_size=cfg.img_size,
            init="none",
            overrides=dict(
                patch_size=cfg.patch_size,
                embed_dim=cfg.width,
                depth=cfg.depth,
                num_heads=max(1, cfg.width // 32),
                moe_layers=cfg.moe_layers,
                num_experts=cfg.num_experts,
                top_k=cfg.top_k,
                expert_init=cfg.expert_init,
                expert_dropout=cfg.expert_dropout,
                noisy_gating=cfg.noisy_gating,
                lambda_bias_init=cfg.lambda_bias_init,
                context_init_std=cfg.context_init_std,
            ),
        ),
        teachers=TeacherConfig(
            names=DEMO_TEACHERS,
            weights=str(weights),
            router_contexts=cast(Literal["assigned", "shuffled"], router_contexts),
        ),
        optim=OptimConfig(
            lr=cfg.stage1_lr,
            lr_reference_batch=cfg.stage1_batch,
            max_lr=cfg.stage1_lr,
            pretrained_lr_scale=1.0,
            router_lr_scale=cfg.router_lr_scale,
            warmup_epochs=0.1 * epochs,
        ),
    )


def stage2_config(
    cfg: DemoConfig,
    data: Path,
    init: Path,
    out: Path,
    weights: Path,
    seed: int,
    tasks: tuple[str, ...] = (),
    steps: int | None = None,
    task_contexts: str = "own",
    distill: bool = True,
    router_lr_scale: float = 1.0,
    batch: int | None = None,
    scored: bool = False,
) -> Stage2Config:
    """Stage 2 at demo size: every task (or ``tasks``) for ``steps`` of ``batch`` (default
    ``cfg.stage2_steps`` of ``cfg.stage2_batch``), the distillation regulariser on unless ``distill`` is
    false, no held-out validation (the demo evaluates the val split once at the end).
    ``task_contexts="shuffled"`` is the control run; ``router_lr_scale`` speeds up the routers and context
    tables. ``scored`` runs (the multi-task run and the baselines) take the demo's Stage-2 losses
    (``cfg.stage2_loss_weights`` and ``cfg.stage2_class_balance``, for the tasks they train) and its
    boundary settings (``cfg.stage2_subpixel_heads``, ``cfg.stage2_edge_label``)."""
    steps = steps or cfg.stage2_steps
    trained = tasks or tuple(dataset_tasks(DATASET))

    def losses(values: dict[str, float]) -> dict[str, float]:
        return {t: v for t, v in values.items() if t in trained} if scored else {}

    return Stage2Config(
        dataset=DATASET,
        data=str(data),
        init=str(init),
        out=str(out),
        tasks=tasks,
        img_size=(cfg.img_size, cfg.img_size),
        iters=steps,
        batch_size=cfg.stage2_batch if batch is None else batch,
        workers=0,
        seed=seed,
        amp="fp32",
        lr=cfg.stage2_lr,
        router_lr_scale=router_lr_scale,
        task_contexts=cast(Literal["own", "shuffled"], task_contexts),
        holdout=0.0,
        ckpt_every=steps,
        keep_last=1,
        log_every=10,
        distill=DistillConfig(alpha=1.0 if distill else 0.0, teachers=DEMO_TEACHERS, weights=str(weights)),
        scale_range=cfg.stage2_scale_range,
        photometric=cfg.stage2_photometric,
        loss_weights=losses(cfg.stage2_loss_weights),
        class_balance=losses(cfg.stage2_class_balance),
        subpixel_heads=tuple(t for t in cfg.stage2_subpixel_heads if t in trained) if scored else (),
        edge_label=cfg.stage2_edge_label if scored else "released",
    )


def write_data(root: Path, cfg: DemoConfig, seed: int) -> tuple[Path, Path]:
    """Write the demo's data sets under ``root``: the Stage-1 image folder, PASCAL-Context and NYUD-v2 in
    their release layouts; returns the image folder and the PASCAL-Context root."""
    size = (cfg.img_size, cfg.img_size)
    images = write_scene_images(root / "images", cfg.stage1_images, size, seed, zoom=cfg.zoom)
    pascal = write_scene_pascal(
        root / "PASCALContext", cfg.train_images, cfg.val_images, size, seed, cfg.zoom
    )
    nyud_val = max(1, cfg.nyud_images // 4)
    write_scene_nyud(root / "NYUDv2", cfg.nyud_images, nyud_val, size, seed, cfg.zoom)
    return images, pascal.root


@dataclass
class DemoResult:
    """Where everything went and the headline numbers."""

    out: Path
    report: Path
    metrics: dict[str, Any]
    timings: dict[str, float]
    figures: dict[str, Path] = field(default_factory=dict)


@contextlib.contextmanager
def _stage(timings: dict[str, float], name: str, cpu: dict[str, float]) -> Iterator[None]:
    print(f"[demo] {name}", flush=True)
    tic, cpu_tic = time.perf_counter(), _cpu_time()
    yield
    timings[name] = time.perf_counter() - tic
    cpu[name] = _cpu_time() - cpu_tic


def _cpu_time() -> float:
    """CPU seconds of this process and of its finished worker processes (all their threads)."""
    try:
        import resource  # Unix only; elsewhere the workers' CPU seconds are not counted
    except ImportError:
        return time.process_time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def run_demo(
    out: str | Path = "runs/demo",
    quick: bool = False,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    config: DemoConfig | None = None,
    workers: int | None = None,
) -> DemoResult:
    """Run the whole demo into ``out`` and return where the report and figures are. The trainings run
    side by side in ``workers`` processes of one thread each (default: one per usable core); their results
    do not depend on ``workers``. The processes are spawned: a script calling this with more than one
    worker must do so under ``if __name__ == "__main__":``."""
    from prism_vfm.evaluate import evaluate

    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    cfg = config or demo_config(quick, seed)
    if cfg.teachers.zoom != cfg.zoom:
        raise ValueError(
            f"the demo teachers are pretrained on scenes of zoom {cfg.teachers.zoom} but the demo renders "
            f"zoom {cfg.zoom}: set DemoConfig.teachers.zoom to {cfg.zoom}"
        )
    out = Path(out)
    prepare_output(out)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}  # CPU seconds of this process and its workers: load-independent
    size = (cfg.img_size, cfg.img_size)
    start, cpu_start = time.perf_counter(), _cpu_time()

    # The three teachers leave one of two workers idle for a teacher's time: the data sets are written
    # then, in the same workers, after the scenes the teachers pretrain on (when a teacher is missing).
    with _stage(timings, "data and teachers", cpu), tempfile.TemporaryDirectory(prefix="prism_demo_") as tmp:
        jobs = teacher_jobs(cfg.teachers, cache, Path(tmp), workers or usable_cores())
        jobs.append(Job("data", write_data, (out / "data", cfg, seed)))
        first = run_jobs(jobs, workers, log=lambda line: print(f"[demo] {line}", flush=True))
    weights = cache
    images, pascal_root = first["data"].value
    cpu["data"] = first["data"].cpu_s  # in a worker: not in this process's time
    cpu["teachers"] = sum(r.cpu_s for n, r in first.items() if n != "data")  # their scenes too
    tasks = tuple(dataset_tasks(DATASET))
    jobs = training_jobs(cfg, images, pascal_root, out, weights, cache, seed)
    runs = sum(j.name.split("/")[0] in TRAININGS for j in jobs)
    with _stage(timings, f"training ({runs} runs)", cpu):
        results = run_jobs(jobs, workers, log=lambda line: print(f"[demo] {line}", flush=True))
    for group, names in job_groups(jobs).items():
        cpu[group] = sum(results[n].cpu_s for n in names)  # in the workers: not in this process's time
    parallel = {
        "workers": len({r.worker for r in results.values()}),
        "critical_path_cpu_s": critical_path(results),
        "runs": {n: {"cpu_s": r.cpu_s, "wall_s": r.wall_s, "worker": r.worker} for n, r in results.items()},
    }
    multi = run_checkpoint(results["stage2"].value)
    baselines = {task: results[f"evaluation/single_task/{task}"].value for task in tasks}
    with _stage(timings, "evaluation", cpu):
        metrics = evaluate(
            multi, DATASET, pascal_root, out=out / "eval", workers=0, baselines=baselines, img_size=size
        )
    with _stage(timings, "analysis and report", cpu):
        from prism_vfm.demo.report import write_report

        figures, analysis = write_report(
            out,
            cfg,
            run_checkpoint(results[f"stage1/{run_name('assigned', seed)}"].value),
            multi,
            pascal_root,
            metrics,
            baselines,
            timings,
            {kind: results[f"analysis/specialisation by {kind}"].value for kind in ("teacher", "task")},
            results["analysis/teacher probes"].value,
            seed,
            cpu,
        )
    timings["total"] = time.perf_counter() - start
    cpu["total"] = _cpu_time() - cpu_start
    summary = {
        "config": dataclasses.asdict(cfg),
        "seed": seed,
        "timings_s": timings,
        "cpu_s": cpu,
        "scores": metrics["scores"],
        "present_classes": analysis["present_classes"],
        "targets": analysis["targets"],
        "single_task": baselines,
        "delta_m": metrics["delta_m"],
        "specialisation": analysis["specialisation"],
        "parallel": parallel,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return DemoResult(out, out / "report.md", metrics, timings, figures)


def train_run(
    stage: Literal["stage1", "stage2"], config: Any, teachers: DemoTeacherConfig, cache: Path
) -> Path:
    """One demo training in any process: registers the (cached) demo teachers there, then runs
    ``train_stage1`` or ``train_stage2`` with ``config`` (a Stage-2 ``init`` naming a run folder starts
    from that run's latest checkpoint); returns its run folder."""
    from prism_vfm.distill.trainer import train_stage1
    from prism_vfm.finetune.trainer import train_stage2

    prepare_teachers(teachers, cache, progress=False)  # cached by now: only registers them
    if stage == "stage1":
        return train_stage1(config)
    return train_stage2(dataclasses.replace(config, init=str(run_checkpoint(Path(config.init)))))


def training_jobs(
    cfg: DemoConfig, images: Path, pascal: Path, out: Path, weights: Path, cache: Path, seed: int
) -> list[Job]:
    """Every training of the demo as a job, longest first where it matters: the demo seed's Stage 1,
    which all of Stage 2 starts from; the multi-task Stage 2 (the longest run); the other Stage-1 runs;
    the short Stage-2 specialisation runs; the single-task baselines. After them come the jobs that read
    finished runs (``evaluation/single_task/<task>``: a baseline's headline score; ``analysis/...``: the
    specialisation of the seed and control runs by teacher and by task, the teachers' probes), each
    waiting for exactly the runs it reads."""
    seeds = cfg.seeds(seed)
    first = f"stage1/{run_name('assigned', seed)}"
    student = out / "stage1" / run_name("assigned", seed)  # a run folder: its checkpoint once it has run

    def job(name: str, stage: Literal["stage1", "stage2"], config: Any, after: tuple[str, ...] = ()) -> Job:
        return Job(name, train_run, (stage, config, cfg.teachers, cache), after=after)

    def stage1(contexts: str, s: int) -> Job:
        name = run_name(contexts, s)
        return job(
            f"stage1/{name}",
            "stage1",
            stage1_config(cfg, images, out / "stage1" / name, weights, s, contexts),
        )

    def stage2(name: str, s: int, **kwargs: Any) -> Job:
        config = stage2_config(cfg, pascal, student, out / name, weights, s, **kwargs)
        return job(name, "stage2", config, after=(first,))

    jobs = [stage1("assigned", seed), stage2("stage2", seed, distill=cfg.stage2_distill, scored=True)]
    jobs += [stage1(c, s) for s in seeds for c in ("assigned", CONTROL) if (c, s) != ("assigned", seed)]
    jobs += [
        stage2(
            f"stage2_routing/{run_name(c, s)}",
            s,
            steps=cfg.routing_steps,
            batch=cfg.routing_batch,
            task_contexts=c,
            router_lr_scale=cfg.routing_router_lr_scale,
            distill=cfg.routing_distill,
        )
        for s in seeds
        for c in ("own", CONTROL)
    ]
    jobs += [
        stage2(
            f"single_task/{task}",
            seed,
            tasks=(task,),
            steps=cfg.single_task_steps,
            batch=cfg.single_task_batch,
            distill=cfg.single_task_distill,
            scored=True,
        )
        for task in dataset_tasks(DATASET)
    ]
    # What only needs finished runs is done in the workers too, by the one that is not on the critical
    # path (the demo seed's Stage 1 and the multi-task Stage 2): the baselines' scores, the specialisation
    # of every seed and control run, and the teachers' probes.
    from prism_vfm.demo.report import specialisation_of

    size = (cfg.img_size, cfg.img_size)
    jobs += [
        Job(
            f"evaluation/single_task/{task}",
            evaluate_baseline,
            (out / "single_task" / task, task, pascal, size),
            after=(f"single_task/{task}",),
        )
        for task in dataset_tasks(DATASET)
    ]
    for kind, stage, contexts in (("teacher", "stage1", "assigned"), ("task", "stage2_routing", "own")):
        runs = {(c, s): out / stage / run_name(c, s) for s in seeds for c in (contexts, CONTROL)}
        after = tuple(f"{stage}/{run_name(c, s)}" for c, s in runs)
        jobs.append(
            Job(
                f"analysis/specialisation by {kind}",
                specialisation_of,
                (kind, runs, pascal, size),
                after=after,
            )
        )
    jobs.append(Job("analysis/teacher probes", teacher_probe, (cfg.teachers, cache)))
    return jobs


def evaluate_baseline(run: Path, task: str, data: Path, img_size: tuple[int, int]) -> float:
    """The headline score of the single-task baseline trained in ``run`` (its latest checkpoint) on the
    val split; everything ``evaluate`` writes goes to ``run/eval``."""
    from prism_vfm.evaluate import evaluate

    result = evaluate(
        run_checkpoint(run),
        DATASET,
        data,
        out=run / "eval",
        workers=0,
        baselines={},  # these scores are the baselines: no Δm
        img_size=img_size,
    )
    return float(result["scores"][task][HEADLINE_METRICS[task]])


TRAININGS: Final = ("stage1", "stage2", "stage2_routing", "single_task")
"""The first parts of the names of the demo's training jobs (the others evaluate and analyse)."""


def job_groups(jobs: list[Job]) -> dict[str, list[str]]:
    """The demo's jobs by stage, for the CPU seconds per stage."""
    labels = {
        "stage1": "stage 1 (seeds × teacher and shuffled contexts)",
        "stage2": "stage 2 (multi-task)",
        "stage2_routing": "stage 2 (seeds × task and shuffled contexts, short)",
        "single_task": "stage 2 (single-task baselines)",
        "evaluation": "evaluation of the baselines",
        "analysis": "specialisation of every run, teacher probes",
    }
    groups: dict[str, list[str]] = {}
    for j in jobs:
        groups.setdefault(labels[j.name.split("/")[0]], []).append(j.name)
    return groups


def run_checkpoint(run: Path) -> Path:
    """The latest checkpoint of the demo run folder ``run`` (every stage saves one at its last step)."""
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"{run} holds no checkpoint: its training did not finish")
    return ckpt
