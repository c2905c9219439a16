"""The video demo's figures and ``report.md``: accuracy per head and motion group, the experts' analyses,
example clips with predictions, and sentences generated from the numbers (never written in advance)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from prism_vfm.analysis.plotting import heatmap_grid, new_figure, save
from prism_vfm.video.demo import clips as demo_clips
from prism_vfm.video.demo.pipeline import EXPERT_RUNS
from prism_vfm.video.expert_report import ClassTable

GROUP_ORDER = tuple(demo_clips.MOTION_GROUPS)


def _pm(s: dict[str, float]) -> str:
    """``mean ± sd`` (just the value for one seed)."""
    return f"{s['mean']:.1f} ± {s['sd']:.1f}" if s["n"] > 1 else f"{s['mean']:.1f}"


def compare(a: dict[str, float], b: dict[str, float], name_a: str, name_b: str, what: str) -> str:
    """One sentence comparing two spreads of a score (``mean``, ``sd``, ``min``, ``max``, ``n``)."""
    diff = a["mean"] - b["mean"]
    if a["n"] > 1 and b["n"] > 1:
        if a["min"] > b["max"]:
            verdict = f"above it in every seed (worst seed {a['min']:.1f} vs best {b['max']:.1f})"
        elif a["max"] < b["min"]:
            verdict = f"below it in every seed (best seed {a['max']:.1f} vs worst {b['min']:.1f})"
        else:
            verdict = "the seeds' ranges overlap, so this run cannot tell them apart"
    else:
        verdict = "one seed only, so no spread to judge the difference by"
    return f"On {what}, {name_a} scores {_pm(a)} and {name_b} {_pm(b)} ({diff:+.1f} points; {verdict})."


# ------------------------------------------------------------------------------------------ figures
def plot_group_accuracy(results: dict[str, Any], path: Path) -> Path:
    """Motion accuracy per motion group and on the two pair tests, one bar per head (seed mean ± sd)."""
    columns = [*GROUP_ORDER, "reversal pairs", "blink pair"]
    fig, axes = new_figure(1, (max(8.0, 1.3 * len(columns)), 3.6))
    ax = axes[0]
    names = list(results)
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        mean = results[name]["mean"]
        stats = [mean["motion_by_group"].get(g) for g in GROUP_ORDER]
        stats += [mean["reversal_pairs"], mean["blink_pair"]]
        values = [s["mean"] if s else np.nan for s in stats]
        errors = [s["sd"] if s else 0.0 for s in stats]
        ax.bar(np.arange(len(columns)) + k * width, values, width, yerr=errors, label=results[name]["label"])
    ax.set_xticks(np.arange(len(columns)) + 0.4 - width / 2, columns, rotation=15)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("motion accuracy per motion group; pair tests: own class above its partner (chance 50)")
    ax.legend(fontsize=6, ncol=2)
    return save(fig, path)


def plot_stream_ablation(results: dict[str, Any], runs: list[str], path: Path) -> Path:
    """Motion accuracy per group with each expert hidden from the read-out, one panel per run (first
    seed); columns: nothing hidden, then the expert hidden (by its stream's rate)."""
    panels = []
    groups: list[str] = []
    columns: list[str] = []
    for name in runs:
        ablation = results[name]["analysis"][0]["stream_ablation"]
        rows = list(ablation["accuracy"])
        groups = ablation["groups"]
        matrix = np.array([[ablation["accuracy"][r][g] for r in rows] for g in groups])
        panels.append((matrix, results[name]["label"]))
        columns = ["none"] + [r.split(" (")[0].removeprefix("expert ") for r in rows[1:]]
    return heatmap_grid(
        panels,
        path,
        groups,
        "expert hidden",
        "motion accuracy (%)",
        vmax=100.0,
        col_labels=columns,
        max_cols=2,
    )


def plot_gate_mass(results: dict[str, Any], runs: list[str], path: Path) -> Path:
    """Attention mass per token share by motion group and expert, one panel per run (seed 1)."""
    panels = []
    groups: list[str] = []
    for name in runs:
        gate = results[name]["analysis"][0]["gate_mass_per_token"]
        groups = [g for g in gate["by_group"] if g != "all"]
        panels.append((np.array([gate["by_group"][g] for g in groups]), results[name]["label"]))
    experts = results[runs[0]]["analysis"][0]["gate_mass_per_token"]["experts"]
    return heatmap_grid(
        panels,
        path,
        groups,
        "expert",
        "attention mass / token share (1 = uniform)",
        col_labels=[e.split(" (")[0].removeprefix("expert ") for e in experts],
        max_cols=2,
    )


def plot_examples(data: Path, results: dict[str, Any], table: ClassTable, count: int, path: Path) -> Path:
    """Test clips (every 4th frame) with the true class and the first seed's predictions of three heads."""
    with (data / "clips.csv").open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    labels = results["vidprism"]["labels"]
    # reversal pairs and blinks first: where the heads disagree
    tricky = {m for pair in demo_clips.REVERSAL_PAIRS for m in pair} | set(demo_clips.BLINK_PAIR)
    order = [i for i, r in enumerate(rows) if r["motion"] in tricky]
    picked, seen = [], set()
    for i in order:
        if rows[i]["motion"] not in seen:
            picked.append(i)
            seen.add(rows[i]["motion"])
        if len(picked) == count:
            break
    heads = [h for h in ("mean_pool", "temporal_transformer", "vidprism") if h in results]
    frames_shown = list(range(0, demo_clips.NUM_FRAMES, 4))
    fig, axes = new_figure(len(picked) * len(frames_shown), (0.9, 1.25), max_cols=len(frames_shown))
    for r, i in enumerate(picked):
        row = rows[i]
        clip = demo_clips.render_clip(row["shape"], row["motion"], row["colour"], int(row["seed"]))
        guesses = ", ".join(
            f"{results[h]['label'].split(' ')[0]} {table.names[results[h]['predictions'][i]]}" for h in heads
        )
        for c, t in enumerate(frames_shown):
            ax = axes[r * len(frames_shown) + c]
            ax.imshow(clip.frames[t])
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:  # the caption spans the row; kept out of the layout so the frames stay evenly spaced
                caption = ax.text(
                    0, 1.08, f"true: {table.names[labels[i]]} | {guesses}", fontsize=6, transform=ax.transAxes
                )
                caption.set_in_layout(False)
    return save(fig, path)


# ----------------------------------------------------------------------------------------- markdown
def _probe_sentence(analyses: list[dict[str, Any]], rates: list[str]) -> str:
    """Whether slow experts read shape better and fast experts the motion group, in every seed."""
    fast, slow = [0, 1], [2, 3]
    gaps: dict[str, list[float]] = {"shape": [], "group": []}
    for analysis in analyses:
        probes = analysis["probes"]["accuracy"]
        # shape: slow minus fast (the paper: slow = spatial); group: fast minus slow (fast = temporal)
        gaps["shape"].append(
            float(np.mean([probes["shape"][i] for i in slow]) - np.mean([probes["shape"][i] for i in fast]))
        )
        gaps["group"].append(
            float(np.mean([probes["group"][i] for i in fast]) - np.mean([probes["group"][i] for i in slow]))
        )

    def verdict(values: list[float], what: str) -> tuple[bool, str]:
        mean = float(np.mean(values))
        text = f"{what}: {mean:+.1f} points (per seed {', '.join(f'{v:+.1f}' for v in values)})"
        return all(v > 0 for v in values) and len(values) > 1, text

    spatial, spatial_text = verdict(gaps["shape"], "shape probe, slow experts minus fast")
    temporal, temporal_text = verdict(gaps["group"], "motion-group probe, fast experts minus slow")
    if spatial and temporal:
        conclusion = (
            "the paper's division (slow experts spatial, fast experts temporal) appears in every seed"
        )
    elif spatial or temporal:
        conclusion = "the paper's division appears only in part (a gap positive in every seed counts)"
    elif len(analyses) == 1:
        conclusion = "one seed cannot establish the paper's division either way"
    else:
        conclusion = "the paper's division does not appear here (no gap is positive in every seed)"
    return (
        f"Linear probes of each expert's pooled output (fitted on the training clips, scored on the test "
        f"clips; fast = {rates[0]}, {rates[1]}; slow = {rates[2]}, {rates[3]}): {spatial_text}; "
        f"{temporal_text}. So {conclusion}."
    )


def _ablation_sentence(analysis: dict[str, Any]) -> str:
    drop = analysis["stream_ablation"]["drop"]
    groups = analysis["stream_ablation"]["groups"]
    parts = []
    for g_index, group in enumerate(groups):
        if group == "all":
            continue
        worst = max(drop, key=lambda e: drop[e][g_index])
        loss = drop[worst][g_index]
        parts.append(f"{group}: {worst.split(' (')[0]} ({loss:+.1f})" if loss > 0 else f"{group}: none")
    return (
        "Hiding one expert from the read-out (attention renormalised over the others), the expert whose "
        "loss costs each motion group the most motion accuracy, in points: " + "; ".join(parts) + "."
    )


def _ablation_table(analysis: dict[str, Any]) -> list[str]:
    """Motion accuracy per group with each expert hidden from the read-out (rows), as a markdown table."""
    accuracy = analysis["stream_ablation"]["accuracy"]
    groups = analysis["stream_ablation"]["groups"]
    lines = [
        "| hidden from the read-out (% motion) | " + " | ".join(groups) + " |",
        "|---|" + "---|" * len(groups),
    ]
    for hidden, row in accuracy.items():
        lines.append(f"| {hidden} | " + " | ".join(f"{row[g]:.1f}" for g in groups) + " |")
    return lines


def _gate_sentence(analysis: dict[str, Any]) -> str:
    gate = analysis["gate_mass_per_token"]
    overall = gate["by_group"]["all"]
    best = int(np.argmax(overall))
    values = ", ".join(f"{v:.2f}" for v in overall)
    return (
        f"Attention mass per token share over all test clips (1 = uniform): {values} for experts 0–3; the "
        f"read-out favours {gate['experts'][best]} per token. Raw gates mostly follow token counts "
        f"({'/'.join(str(c) for c in gate['tokens'])}), which is why they are divided here."
    )


def _order_caveats(mean: dict[str, Any], label: dict[str, str]) -> list[str]:
    """Sentences on what the reversal-pair scores can mean, from the order-blind heads' own scores."""
    lines = []
    blind = [n for n in ("mean_pool", "vidprism_no_dbi") if n in mean]
    above = [n for n in blind if mean[n]["reversal_pairs"]["min"] > 55.0]
    if above:
        names = " and ".join(f"{label[n]} ({_pm(mean[n]['reversal_pairs'])})" for n in above)
        lines += [
            f"Heads blind to frame order score above chance on the reversal pairs: {names}. They cannot "
            "read order, so something else separates these clips here (each clip is compressed on its "
            "own, for one); only an order-reading head's margin over them, and its flip rate above, "
            "measure the use of order.",
            "",
        ]
    return lines


def write_markdown(
    out: Path,
    cfg: Any,
    dataset: Any,
    results: dict[str, Any],
    table: ClassTable,
    timings: dict[str, float],
    seeds: list[int],
    figures: dict[str, Path],
) -> Path:
    """Write ``out/report.md`` from the results."""
    mean = {name: r["mean"] for name, r in results.items()}
    label = {name: r["label"] for name, r in results.items()}
    n_test = len(dataset.samples["test"])
    n_train = len(dataset.samples["train"])
    lines = [
        "# VidPrism demo report",
        "",
        f"{len(table.names)} video classes (shape × motion, {len(demo_clips.MOTIONS)} motions in "
        f"{len(demo_clips.MOTION_GROUPS)} groups), {demo_clips.NUM_FRAMES} frames of "
        f"{demo_clips.FRAME_SIZE}² per clip; {n_train} training clips, {n_test} test clips. Heads trained "
        f"by `prism video train` on frozen frame features of a tiny image-text model, {cfg.epochs} epochs, "
        f"seeds {seeds} (the data are the same for every seed; ± is the standard deviation over seeds).",
        "",
        *(
            [
                f"{label['vidprism_finetuned']}: VidPrism as released trained end to end by `prism video "
                f"train` on the videos (released augmentation, {cfg.finetune_epochs} epochs, seed "
                f"{seeds[0]}), the image encoder at 0.06 × the head's learning rate as released.",
                "",
            ]
            if "vidprism_finetuned" in results
            else []
        ),
        *(
            [
                "**Quick mode**: every size is cut to check that the pipeline runs; the image-text model "
                "and the heads are barely trained and the numbers below mean nothing about the method.",
                "",
            ]
            if cfg.quick
            else []
        ),
        "## Accuracy by head (test clips, %)",
        "",
        "top-1 over the classes; motion: the predicted class has the right motion; shape likewise; reversal "
        "pairs: the clip's own class scores above the same shape with the time-reversed motion (chance 50); "
        "blink pair: above the same shape blinking at the other rate (chance 50).",
        "",
        "| head | top-1 | motion | shape | reversal pairs | blink pair |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in mean.items():
        cells = [_pm(m[k]) for k in ("top1", "motion", "shape", "reversal_pairs", "blink_pair")]
        lines.append(f"| {label[name]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Motion accuracy per motion group (%)",
        "",
        "| head | " + " | ".join(GROUP_ORDER) + " |",
        "|---|" + "---|" * len(GROUP_ORDER),
    ]
    for name, m in mean.items():
        cells = [_pm(m["motion_by_group"][g]) if g in m["motion_by_group"] else "–" for g in GROUP_ORDER]
        lines.append(f"| {label[name]} | " + " | ".join(cells) + " |")
    lines += ["", "![accuracy per group](figures/group_accuracy.png)", ""]

    lines += ["## What the numbers say", ""]
    comparisons = [  # (run a, run b, score, what): each one sentence
        ("vidprism", "mean_pool", "motion", "motion accuracy"),
        ("vidprism", "mean_pool", "reversal_pairs", "reversal pairs"),
        ("vidprism", "mean_pool", "blink_pair", "the blink pair"),
        ("vidprism", "temporal_transformer", "motion", "motion accuracy"),
        ("vidprism", "temporal_transformer", "blink_pair", "the blink pair"),
        ("vidprism", "homogeneous", "motion", "motion accuracy"),
        ("vidprism_sum_div", "vidprism", "motion", "motion accuracy"),
        ("vidprism_no_dbi", "vidprism", "reversal_pairs", "reversal pairs"),
    ]
    lines += [
        "- " + compare(mean[a][k], mean[b][k], label[a], label[b], what) for a, b, k, what in comparisons
    ]
    lines += [
        f"- The image-only zero-shot classifier (mean frame embedding against the class names' text "
        f"embeddings) reaches {_pm(mean['image_zero_shot']['top1'])} top-1 and "
        f"{_pm(mean['image_zero_shot']['motion'])} motion accuracy: what the image model knows without "
        "any video training.",
    ]

    lines += ["", "## Do the experts divide the work?", ""]
    flips = []
    for name, run in results.items():
        if run["analysis"]:
            rates = [a["reversal"]["flip"] for a in run["analysis"]]
            flips.append(f"{label[name]} {np.mean(rates):.1f}%")
    lines += [
        "Time reversal: share of reversal-pair test clips whose time-reversed copy is predicted as the "
        "partner of the original's prediction (a head that reads order flips; one blind to order never "
        "does): " + "; ".join(flips) + ".",
        "",
        *_order_caveats(mean, label),
    ]
    first = results["vidprism"]["analysis"][0]
    rates = [e.split("(")[1].rstrip(")") for e in first["gate_mass_per_token"]["experts"]]
    lines += [
        f"VidPrism as released, seed {seeds[0]}:",
        "",
        "- " + _ablation_sentence(first),
        "- " + _gate_sentence(first),
        "- " + _probe_sentence(results["vidprism"]["analysis"], rates),
        "",
        "| probe (% test) | " + " | ".join(f"expert {i} ({r})" for i, r in enumerate(rates)) + " |",
        "|---|" + "---|" * len(rates),
    ]
    for target, values in first["probes"]["accuracy"].items():
        lines.append(f"| {target} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    lines += ["", *_ablation_table(first)]
    lines += [
        "",
        "Motion accuracy with each expert hidden from the read-out (expert i reads the stream of rate "
        "2, 4, 8, 16 for i = 0–3; in the homogeneous control every expert reads the rate-2 stream):",
        "",
        "![stream ablation](figures/stream_ablation.png)",
        "",
        "![gate mass](figures/gate_mass.png)",
        "",
        "## Example test clips",
        "",
        "Every fourth frame; the title gives the true class and the predictions (first seed) of mean "
        "pooling (b), the temporal transformer (c) and VidPrism (e).",
        "",
        "![examples](figures/examples.png)",
        "",
        "## What this demo can show, and what it cannot",
        "",
        "- It runs the whole transfer with the library's own code: clips written in the released list "
        "layout, an image-text model whose frame features and class-name embeddings feed the heads, every "
        "head trained by the same trainer and loss, and the analyses of `prism video analyze`.",
        "- The image-text model is a tiny network trained for minutes on captioned synthetic frames, not "
        "CLIP; the heads see 32-pixel clips of one shape. Which head wins here says nothing about Kinetics "
        "or the paper's numbers.",
        f"- {len(seeds)} seed(s) of the heads on one draw of the data; differences inside the seed spread "
        "are not differences. The paper's claim that experts divide the work from spatial (slow streams) "
        "to temporal (fast streams) is tested above by ablation and probes; where those sentences say it "
        "does not appear, it does not appear at this scale.",
        "- The experts' inputs differ only by rate (as released): a probe or ablation difference between "
        "experts may come from their streams, not from anything they learned.",
        "",
        "## Time per stage (seconds)",
        "",
        "| stage | s |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in timings.items()],
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_report(
    out: Path,
    cfg: Any,
    dataset: Any,
    results: dict[str, Any],
    table: ClassTable,
    timings: dict[str, float],
    seeds: list[int],
) -> dict[str, Path]:
    """The figures and ``report.md``; returns the figures by name."""
    figs = out / "figures"
    expert_runs = list(EXPERT_RUNS)
    figures = {
        "group_accuracy": plot_group_accuracy(results, figs / "group_accuracy.png"),
        "stream_ablation": plot_stream_ablation(results, expert_runs, figs / "stream_ablation.png"),
        "gate_mass": plot_gate_mass(results, expert_runs, figs / "gate_mass.png"),
        "examples": plot_examples(Path(dataset.root), results, table, cfg.examples, figs / "examples.png"),
    }
    write_markdown(out, cfg, dataset, results, table, timings, seeds, figures)
    return figures
