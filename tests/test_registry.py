"""The data-set registry: one place for every data-set fact, read by the readers, losses, metrics and CLI."""

from __future__ import annotations

import dataclasses

import pytest

from prism_vfm.data.nyud import NYUDv2
from prism_vfm.data.pascal_context import PascalContext
from prism_vfm.data.registry import DATASETS, backbone_name, dataset_tasks, get_dataset
from prism_vfm.losses.tasks import MultiTaskLoss
from prism_vfm.metrics.boundary import dataset_max_dist_ratio
from prism_vfm.metrics.multitask import MultiTaskMeter


def test_aliases_name_one_data_set():
    assert get_dataset("pascal") is get_dataset("pascalcontext") is get_dataset("pascal-context")
    assert get_dataset("nyudv2") is get_dataset("nyud")
    with pytest.raises(ValueError, match="unknown dataset 'cityscapes'"):
        get_dataset("cityscapes")


def test_records_are_frozen():
    info = get_dataset("nyud")
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.input_size = (1, 1)  # type: ignore[misc]
    with pytest.raises(TypeError):
        info.tasks["semseg"] = 41  # type: ignore[index]


def test_every_consumer_reads_the_registry():
    for info in DATASETS.values():
        assert dict(info.tasks) == dataset_tasks(info.name)
        assert set(info.loss_weights) == set(info.tasks) == set(info.headline_metrics)
        assert MultiTaskLoss(info.name).weights == dict(info.loss_weights)
        assert MultiTaskMeter(info.name).meters.keys() == info.tasks.keys()
        for name in (info.name, *info.aliases):
            assert dataset_max_dist_ratio(name) == info.boundary_max_dist_ratio
        for baselines in info.baselines.values():
            assert set(baselines) == set(info.tasks)
    assert get_dataset("pascal").reader_class() is PascalContext
    assert get_dataset("nyud").reader_class() is NYUDv2
    assert get_dataset("nyud").lower_is_better == {"normals", "depth"}
    assert get_dataset("pascalcontext").lower_is_better == {"normals"}


def test_baselines_are_per_backbone_and_a_missing_one_is_named():
    pascal, nyud = get_dataset("pascalcontext"), get_dataset("nyud")
    assert pascal.baselines_for("vit_l")["semseg"] == 81.61 != pascal.baselines_for("vit_b")["semseg"]
    with pytest.raises(ValueError, match="NYUD-v2 has no single-task baselines for vit_l"):
        nyud.baselines_for(backbone_name(1024, 24))
    with pytest.raises(ValueError, match="a ViT of width 32 and depth 4"):
        pascal.baselines_for(backbone_name(32, 4))
