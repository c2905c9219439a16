"""What VidPrism's experts do, measured on labelled clips: accuracy per group of classes, the read-out
with one expert hidden, attention mass per token, linear probes of each expert, and time reversal.

Every function takes tensors (or a prediction callable) and returns plain numbers, so it serves any
temporal head on frame features (:class:`~prism_vfm.video.feature_model.FeatureClassifier`) and is tested on
constructed inputs. ``class_group[c]`` names the group of class ``c`` (for example the kind of motion);
accuracies are percentages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Collected:
    """A head's outputs on a set of clips, concatenated over batches."""

    logits: Tensor  # (N, C)
    gates: Tensor  # (N, E) attention mass per expert
    summaries: Tensor  # (N, E, D) time-mean of each expert's output
    token_counts: list[int]  # tokens per expert


@torch.no_grad()
def collect(
    model: nn.Module, features: Tensor, batch_size: int = 256, drop_experts: Sequence[int] = ()
) -> Collected:
    """Run ``model`` (frame features (B, T, D) → ``HeadOutput``) in eval mode over ``features`` (N, T, D)."""
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, len(features), batch_size):
        chunk = features[start : start + batch_size]
        out = model(chunk, drop_experts=drop_experts) if drop_experts else model(chunk)
        parts.append(out)
    model.train(was_training)
    return Collected(
        logits=torch.cat([o.logits for o in parts]),
        gates=torch.cat([o.gates for o in parts]),
        summaries=torch.cat([o.expert_summaries for o in parts]),
        token_counts=[x.shape[1] for x in parts[0].expert_outputs],
    )


def _groups(class_group: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(class_group))


def accuracy_by_group(
    predictions: Tensor,
    labels: Tensor,
    class_group: Sequence[str],
    attribute: Sequence[object] | None = None,
) -> dict[str, float]:
    """Accuracy (%) of the clips of each group, and ``"all"``.

    A prediction is right when it is the label, or, with ``attribute`` (one value per class, e.g. the
    motion of each (shape, motion) class), when its class has the label's attribute. Groups with no clip
    are left out."""
    labels = labels.long()
    if attribute is None:
        right = predictions == labels
    else:
        codes = {a: i for i, a in enumerate(dict.fromkeys(attribute))}
        table = torch.tensor([codes[a] for a in attribute])
        right = table[predictions] == table[labels]
    group_of = [class_group[int(c)] for c in labels]
    result = {}
    for name in _groups(class_group):
        mask = torch.tensor([g == name for g in group_of], dtype=torch.bool)
        if mask.any():
            result[name] = 100.0 * float(right[mask].float().mean())
    result["all"] = 100.0 * float(right.float().mean())
    return result


@dataclass
class StreamAblation:
    """Accuracy (%) per group with each expert hidden from the read-out (row ``"none"``: all seen)."""

    rows: list[str]  # "none", then one per expert
    groups: list[str]  # the groups, then "all"
    accuracy: list[list[float]]  # rows × groups

    def drop(self) -> list[list[float]]:
        """Accuracy lost (percentage points) per expert hidden and group: the "none" row minus each row."""
        full = self.accuracy[0]
        return [[f - a for f, a in zip(full, row, strict=True)] for row in self.accuracy[1:]]

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {
            r: dict(zip(self.groups, row, strict=True))
            for r, row in zip(self.rows, self.accuracy, strict=True)
        }


def stream_ablation(
    predict: Callable[[tuple[int, ...]], Tensor],
    num_experts: int,
    labels: Tensor,
    class_group: Sequence[str],
    expert_names: Sequence[str] | None = None,
    attribute: Sequence[object] | None = None,
) -> StreamAblation:
    """Accuracy per group when expert i is hidden from the read-out (its attention renormalised over the
    others), for every i; ``predict(drop)`` returns the predicted classes with the experts ``drop`` hidden
    (e.g. ``lambda drop: collect(model, x, drop_experts=drop).logits.argmax(1)``)."""
    names = list(expert_names) if expert_names is not None else [f"expert {i}" for i in range(num_experts)]
    rows, table = ["none"], []
    full = accuracy_by_group(predict(()), labels, class_group, attribute)
    groups = list(full)
    table.append([full[g] for g in groups])
    for i in range(num_experts):
        acc = accuracy_by_group(predict((i,)), labels, class_group, attribute)
        rows.append(names[i])
        table.append([acc[g] for g in groups])
    return StreamAblation(rows, groups, table)


def gate_mass_per_token(
    gates: Tensor, token_counts: Sequence[int], labels: Tensor, class_group: Sequence[str]
) -> dict[str, list[float]]:
    """Per group, each expert's mean attention mass divided by its share of the tokens.

    1 for every expert when the read-out attends uniformly to all tokens; above 1, the expert's tokens
    draw more attention than their number (the gates alone mostly reflect token counts, 16/8/4/2)."""
    counts = torch.tensor(token_counts, dtype=gates.dtype)
    per_token = gates / (counts / counts.sum())
    group_of = [class_group[int(c)] for c in labels]
    result = {}
    for name in _groups(class_group):
        mask = torch.tensor([g == name for g in group_of], dtype=torch.bool)
        if mask.any():
            result[name] = per_token[mask].mean(0).tolist()
    result["all"] = per_token.mean(0).tolist()
    return result


def linear_probe(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, ridge: float = 1e-3
) -> float:
    """Test accuracy (%) of a ridge-regression classifier (one-hot targets, closed form, features
    standardised on the training set): how linearly ``x`` encodes ``y``. Deterministic."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    a = torch.cat([(train_x - mean) / std, train_x.new_ones(len(train_x), 1)], dim=1).double()
    b = torch.cat([(test_x - mean) / std, test_x.new_ones(len(test_x), 1)], dim=1).double()
    classes = int(max(train_y.max(), test_y.max())) + 1
    target = F.one_hot(train_y.long(), classes).double()
    eye = torch.eye(a.shape[1], dtype=torch.float64) * ridge * len(a)
    w = torch.linalg.solve(a.T @ a + eye, a.T @ target)
    return 100.0 * float(((b @ w).argmax(1) == test_y.long()).float().mean())


def expert_probes(
    train_summaries: Tensor,
    test_summaries: Tensor,
    targets: Mapping[str, tuple[Tensor, Tensor]],
    ridge: float = 1e-3,
) -> dict[str, list[float]]:
    """Linear-probe accuracy (%) of each expert's pooled output (N, E, D) for each target
    (name → (train labels, test labels)): ``{target: [accuracy of expert 0, 1, ...]}``."""
    return {
        name: [
            linear_probe(train_summaries[:, e], y_train, test_summaries[:, e], y_test, ridge)
            for e in range(train_summaries.shape[1])
        ]
        for name, (y_train, y_test) in targets.items()
    }


def reversal_flip_rate(
    predict: Callable[[Tensor], Tensor], features: Tensor, labels: Tensor, partner: Mapping[int, int]
) -> dict[str, float]:
    """How a head answers time-reversed clips of classes that come in reversal pairs.

    ``partner`` maps a class to its time-reversed class (both directions). Over the clips whose label has
    a partner: ``flip`` is the % whose reversed clip is predicted as the partner of the original clip's
    prediction (a head that reads order flips; one blind to order never does), ``same`` the % whose
    prediction does not change. ``predict`` maps frame features (N, T, D) to predicted classes."""
    mask = torch.tensor([int(c) in partner for c in labels], dtype=torch.bool)
    if not mask.any():
        raise ValueError("reversal_flip_rate: no clip's class has a reversal partner")
    clips = features[mask]
    before, after = predict(clips), predict(clips.flip(1))
    flipped = torch.tensor([partner.get(int(p), -1) == int(q) for p, q in zip(before, after, strict=True)])
    return {
        "flip": 100.0 * float(flipped.float().mean()),
        "same": 100.0 * float((before == after).float().mean()),
        "clips": float(mask.sum()),
    }


def pair_accuracy(logits: Tensor, labels: Tensor, partner: Mapping[int, int]) -> dict[str, float]:
    """Over the clips whose class has a partner (e.g. its time-reversed class): the % whose own class
    scores above the partner (chance 50), and how many clips. Raises when no clip has a partner."""
    rows = [i for i, c in enumerate(labels.tolist()) if c in partner]
    if not rows:
        raise ValueError("pair_accuracy: no clip's class has a partner")
    own = logits[rows, labels[rows]]
    other = logits[rows, torch.tensor([partner[int(labels[i])] for i in rows])]
    return {"accuracy": 100.0 * float((own > other).float().mean()), "clips": float(len(rows))}
