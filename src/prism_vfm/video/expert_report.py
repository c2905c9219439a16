"""``prism video analyze``: the specialisation analyses of one trained head on a folder of cached features.

The features folder (:mod:`prism_vfm.video.data.features`) holds the splits and a ``classes.csv`` that
describes the classes: ``id,name,group,partner`` and any further attribute columns (for example ``motion``
and ``shape``). ``group`` gathers classes for the per-group tables (e.g. the kind of motion), ``partner``
names a class's time-reversed class (empty if none); each attribute column is scored (a prediction is right
when its class has the label's value) and probed. Without ``classes.csv`` every class is its own group.

Written to ``out``: ``analysis.json`` and the figures ``stream_ablation.png`` and ``gate_mass.png`` (for
VidPrism's head).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prism_vfm.analysis.plotting import heatmap_grid
from prism_vfm.video.analysis import (
    accuracy_by_group,
    collect,
    expert_probes,
    gate_mass_per_token,
    reversal_flip_rate,
    stream_ablation,
)
from prism_vfm.video.data.features import read_feature_set
from prism_vfm.video.data.lists import read_label_csv
from prism_vfm.video.feature_model import FeatureClassifier


@dataclass
class ClassTable:
    """What ``classes.csv`` says about the classes, in label order."""

    names: list[str]
    group: list[str]
    partner: dict[int, int]  # class → its time-reversed class
    attributes: dict[str, list[str]]  # column → value per class


def read_class_table(folder: str | os.PathLike) -> ClassTable:
    """The class table of a features folder: ``classes.csv``, else one group per class of ``labels.csv``."""
    folder = Path(folder)
    names = read_label_csv(folder / "labels.csv")
    path = folder / "classes.csv"
    if not path.is_file():
        return ClassTable(names, list(names), {}, {})
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0]) if rows else []
    missing = {"id", "name", "group", "partner"} - set(header)
    if missing or len(rows) != len(names):
        raise ValueError(
            f"{path}: expected the columns id,name,group,partner (and attributes) and one row per class of "
            f"labels.csv ({len(names)}); got columns {header} and {len(rows)} rows"
        )
    index = {n: i for i, n in enumerate(names)}
    partner = {}
    for line, row in enumerate(rows, start=2):
        if row["name"] != names[int(row["id"])]:
            raise ValueError(
                f"{path}:{line}: class {row['id']} is {row['name']!r}, labels.csv says "
                f"{names[int(row['id'])]!r}"
            )
        if row["partner"]:
            if row["partner"] not in index:
                raise ValueError(f"{path}:{line}: partner {row['partner']!r} is not a class of labels.csv")
            partner[int(row["id"])] = index[row["partner"]]
    rows.sort(key=lambda r: int(r["id"]))
    extra = [c for c in header if c not in ("id", "name", "group", "partner")]
    return ClassTable(names, [r["group"] for r in rows], partner, {c: [r[c] for r in rows] for c in extra})


def write_class_table(folder: str | os.PathLike, table: ClassTable) -> Path:
    """Write ``classes.csv`` (see :func:`read_class_table`)."""
    path = Path(folder) / "classes.csv"
    columns = ["id", "name", "group", "partner", *table.attributes]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for i, name in enumerate(table.names):
            partner = table.names[table.partner[i]] if i in table.partner else ""
            writer.writerow([i, name, table.group[i], partner, *(v[i] for v in table.attributes.values())])
    return path


def _codes(values: list[str], labels: Tensor) -> Tensor:
    codes = {v: i for i, v in enumerate(dict.fromkeys(values))}
    return torch.tensor([codes[values[int(c)]] for c in labels])


@torch.no_grad()
def analyse_head(
    model: FeatureClassifier,
    features: str | os.PathLike,
    split: str = "test",
    out: str | os.PathLike | None = None,
    probe_split: str = "train",
) -> dict[str, Any]:
    """Every analysis of ``model`` on ``features/<split>.safetensors`` (probes fitted on ``probe_split``).

    Returns (and with ``out`` writes, with figures) a dict: ``accuracy`` by group (and per attribute),
    and for VidPrism's head ``stream_ablation``, ``gate_mass_per_token`` and ``probes``; ``reversal`` when
    classes have partners."""
    folder = Path(features)
    table = read_class_table(folder)
    x, labels = read_feature_set(folder / f"{split}.safetensors", len(table.names))
    model.eval()
    got = collect(model, x)
    pred = got.logits.argmax(1)
    result: dict[str, Any] = {
        "split": split,
        "clips": len(labels),
        "head": model.kind,
        "accuracy": {"class": accuracy_by_group(pred, labels, table.group)},
    }
    for name, values in table.attributes.items():
        result["accuracy"][name] = accuracy_by_group(pred, labels, table.group, values)
    if table.partner:
        result["reversal"] = reversal_flip_rate(
            lambda f: collect(model, f).logits.argmax(1), x, labels, table.partner
        )
    figures: dict[str, Path] = {}
    if model.kind == "vidprism":
        counts = got.token_counts
        rates = model.cfg.rates
        stream = model.cfg.shared_stream
        experts = [f"expert {i} (rate {rates[i if stream < 0 else stream]})" for i in range(len(counts))]
        attribute = next(iter(table.attributes.values()), None)
        ablation = stream_ablation(
            lambda drop: collect(model, x, drop_experts=drop).logits.argmax(1),
            len(counts),
            labels,
            table.group,
            experts,
            attribute,
        )
        result["stream_ablation"] = {
            "scored_by": next(iter(table.attributes), "class"),
            "accuracy": ablation.to_dict(),
            "drop": dict(zip(ablation.rows[1:], ablation.drop(), strict=True)),
            "groups": ablation.groups,
        }
        result["gate_mass_per_token"] = {
            "experts": experts,
            "tokens": counts,
            "by_group": gate_mass_per_token(got.gates, counts, labels, table.group),
        }
        if (folder / f"{probe_split}.safetensors").is_file() and probe_split != split:
            x_fit, y_fit = read_feature_set(folder / f"{probe_split}.safetensors", len(table.names))
            fit = collect(model, x_fit).summaries
            targets = {"group": (_codes(table.group, y_fit), _codes(table.group, labels))}
            for name, values in table.attributes.items():
                targets[name] = (_codes(values, y_fit), _codes(values, labels))
            result["probes"] = {"experts": experts, "accuracy": expert_probes(fit, got.summaries, targets)}
        if out is not None:
            figures = _figures(result, Path(out))
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        result["figures"] = {k: str(v) for k, v in figures.items()}
        (Path(out) / "analysis.json").write_text(json.dumps(result, indent=2))
    return result


def _figures(result: dict[str, Any], out: Path) -> dict[str, Path]:
    ablation = result["stream_ablation"]
    groups = ablation["groups"]
    rows = list(ablation["accuracy"])
    accuracy = np.array([[ablation["accuracy"][r][g] for g in groups] for r in rows])
    gate = result["gate_mass_per_token"]
    mass = np.array([gate["by_group"][g] for g in groups])
    return {
        "stream_ablation": heatmap_grid(
            [(accuracy, "accuracy with the expert hidden from the read-out")],
            out / "stream_ablation.png",
            [f"{r} hidden" if r != "none" else "none hidden" for r in rows],
            "group of classes",
            f"{ablation['scored_by']} accuracy (%)",
            vmax=100.0,
            col_labels=groups,
        ),
        "gate_mass": heatmap_grid(
            [(mass, "attention mass / token share (1 = uniform)")],
            out / "gate_mass.png",
            groups,
            "expert",
            "mass per token share",
            col_labels=[e.split(" (")[1].rstrip(")") for e in gate["experts"]],
        ),
    }
