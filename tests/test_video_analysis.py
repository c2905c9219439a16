"""The specialisation analyses on constructed inputs whose answers are known."""

from __future__ import annotations

import pytest
import torch

from prism_vfm.video.analysis import (
    accuracy_by_group,
    collect,
    expert_probes,
    gate_mass_per_token,
    linear_probe,
    pair_accuracy,
    reversal_flip_rate,
    stream_ablation,
)
from prism_vfm.video.config import HeadConfig
from prism_vfm.video.feature_model import FeatureClassifier
from prism_vfm.video.readout import Combination

pytestmark = pytest.mark.usefixtures("one_thread")

GROUPS = ["slow", "slow", "fast", "fast"]  # group of classes 0..3


def test_accuracy_by_group_counts_each_groups_clips_and_an_attribute_match():
    labels = torch.tensor([0, 1, 2, 3, 2])
    pred = torch.tensor([0, 0, 2, 2, 2])
    acc = accuracy_by_group(pred, labels, GROUPS)
    assert acc == pytest.approx({"slow": 50.0, "fast": 200 / 3, "all": 60.0})
    # by attribute: classes 0/1 share "a", 2/3 share "b": every prediction has the right attribute
    by_attr = accuracy_by_group(pred, labels, GROUPS, attribute=["a", "a", "b", "b"])
    assert by_attr == pytest.approx({"slow": 100.0, "fast": 100.0, "all": 100.0})


def test_stream_ablation_of_a_readout_that_uses_only_one_expert():
    labels = torch.tensor([0, 1, 2, 3])

    def predict(drop):  # right only while expert 1 is seen
        return labels.clone() if 1 not in drop else (labels + 1) % 4

    table = stream_ablation(predict, 3, labels, GROUPS)
    assert table.rows == ["none", "expert 0", "expert 1", "expert 2"]
    assert table.groups == ["slow", "fast", "all"]
    assert table.accuracy == [[100.0] * 3, [100.0] * 3, [0.0] * 3, [100.0] * 3]
    assert table.drop() == [[0.0] * 3, [100.0] * 3, [0.0] * 3]


def test_hiding_an_expert_renormalises_the_readout_over_the_others():
    torch.manual_seed(0)
    readout = Combination(8, 2)
    streams = [torch.randn(3, n, 8) for n in (4, 2, 1)]
    fused, gates, attention = readout(streams, drop=(0, 2))
    assert torch.allclose(gates, torch.tensor([[0.0, 1.0, 0.0]]).expand(3, 3))
    assert torch.allclose(attention.sum(1), torch.ones(3))
    alone, _, _ = readout([streams[1]])  # the read-out over expert 1 alone
    assert torch.allclose(fused, alone, atol=1e-6)
    with pytest.raises(ValueError, match="some but not all"):
        readout(streams, drop=(0, 1, 2))


def test_stream_ablation_through_a_vidprism_head_changes_only_when_an_expert_is_hidden():
    torch.manual_seed(0)
    model = FeatureClassifier(
        "vidprism", HeadConfig(dim=16, num_classes=4, rates=(2, 4), num_experts=2), num_frames=8
    )
    x, labels = torch.randn(12, 8, 16), torch.randint(0, 4, (12,))
    full = collect(model, x).logits
    table = stream_ablation(lambda d: collect(model, x, drop_experts=d).logits.argmax(1), 2, labels, GROUPS)
    assert table.accuracy[0] == list(accuracy_by_group(full.argmax(1), labels, GROUPS).values())
    hidden = collect(model, x, drop_experts=(0,))
    assert torch.allclose(hidden.gates[:, 0], torch.zeros(12)) and not torch.allclose(hidden.logits, full)


def test_gate_mass_per_token_is_one_for_uniform_attention_and_names_the_favoured_expert():
    counts = [4, 2, 1, 1]
    uniform = torch.tensor(counts, dtype=torch.float32).div(8).expand(4, 4)
    labels = torch.tensor([0, 1, 2, 3])
    result = gate_mass_per_token(uniform, counts, labels, GROUPS)
    for values in result.values():
        assert values == pytest.approx([1.0] * 4)
    # the "fast" clips put all attention on expert 3 (1 token of 8): 8 times its share
    skewed = uniform.clone()
    skewed[2:] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    result = gate_mass_per_token(skewed, counts, labels, GROUPS)
    assert result["fast"] == pytest.approx([0.0, 0.0, 0.0, 8.0])
    assert result["slow"] == pytest.approx([1.0] * 4)


def test_linear_probes_find_what_each_expert_encodes():
    torch.manual_seed(0)
    n, d = 200, 6
    shape, group = torch.randint(0, 3, (n,)), torch.randint(0, 2, (n,))
    noise = torch.randn(n, 2, d) * 0.1
    summaries = noise.clone()
    summaries[:, 0, :3] += torch.nn.functional.one_hot(shape, 3).float()  # expert 0: shape only
    summaries[:, 1, 0] += group.float() * 2  # expert 1: group only
    train, test = slice(0, 150), slice(150, None)
    probes = expert_probes(
        summaries[train],
        summaries[test],
        {"shape": (shape[train], shape[test]), "group": (group[train], group[test])},
    )
    assert probes["shape"][0] == 100.0 and probes["shape"][1] < 60.0
    assert probes["group"][1] == 100.0 and probes["group"][0] < 75.0
    assert linear_probe(summaries[train, 0], shape[train], summaries[test, 0], shape[test]) == 100.0


def test_reversal_flip_rate_is_full_for_an_order_reader_and_zero_for_an_order_blind_head():
    # class 0 = rising ramp, class 1 = falling ramp (a reversal pair); class 2 has no partner
    ramp = torch.linspace(-1, 1, 8)[None, :, None]
    x = torch.cat([ramp, -ramp, ramp * 0]).expand(3, 8, 2).clone()
    labels = torch.tensor([0, 1, 2])
    partner = {0: 1, 1: 0}

    def reads_order(f):
        return (f[:, -1, 0] < f[:, 0, 0]).long()

    def blind(f):
        return torch.zeros(len(f), dtype=torch.long)

    assert reversal_flip_rate(reads_order, x, labels, partner) == {"flip": 100.0, "same": 0.0, "clips": 2.0}
    assert reversal_flip_rate(blind, x, labels, partner) == {"flip": 0.0, "same": 100.0, "clips": 2.0}
    with pytest.raises(ValueError, match="no clip"):
        reversal_flip_rate(blind, x[2:], labels[2:], partner)


def test_pair_accuracy_compares_each_clip_with_its_partner_class_only():
    logits = torch.tensor([[2.0, 1.0, 9.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    labels = torch.tensor([0, 1, 2])  # class 2 has no partner; clip 0 is right in its pair though not top-1
    assert pair_accuracy(logits, labels, {0: 1, 1: 0}) == {"accuracy": 50.0, "clips": 2.0}
    with pytest.raises(ValueError, match="no clip"):
        pair_accuracy(logits[2:], labels[2:], {0: 1, 1: 0})
