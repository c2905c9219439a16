"""Collectives valid under NCCL, sharded validation and evaluation, and writes by rank 0 only.

NCCL reduces CUDA tensors only. The CPU cannot run NCCL, so the rule is pinned in two parts that together
cover every run: no module but ``train/distributed.py`` calls a collective (the audit below), and every
helper there hands the process group tensors on its device whatever the caller gives it (checked with the
group's device emulated by the ``meta`` device and a collective that, like NCCL, refuses any other).
The real collectives run in the 2-process gloo tests here and in the trainers' DDP tests, which cross the
logging, validation and checkpoint paths with the same helpers.
"""

from __future__ import annotations

import ast
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from prism_vfm.config import apply_overrides
from prism_vfm.data.dense_transforms import DenseTestTransform
from prism_vfm.data.pascal_context import PascalContext
from prism_vfm.data.registry import dataset_tasks
from prism_vfm.data.tiny_dense import write_tiny_pascal
from prism_vfm.evaluate import evaluate
from prism_vfm.finetune.config import preset, resolved
from prism_vfm.finetune.trainer import validate
from prism_vfm.models.multitask import PrismMultiTask
from prism_vfm.train import distributed
from tests.tiny import TINY

SRC = Path(__file__).resolve().parents[1] / "src" / "prism_vfm"
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "send",
    "recv",
}


def test_only_the_distributed_helpers_call_collectives():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path == SRC / "train" / "distributed.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        aliases = {"torch.distributed"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases |= {a.asname or a.name for a in node.names if a.name == "torch.distributed"}
            if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
                offenders += [f"{path}: imports {a.name}" for a in node.names if a.name in COLLECTIVES]
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value)
                if node.func.attr in COLLECTIVES and owner in aliases:
                    offenders.append(f"{path}:{node.lineno}: {owner}.{node.func.attr}")
    assert not offenders, offenders


@pytest.fixture
def emulated_nccl(monkeypatch):
    """A 2-process NCCL-like group in this process: its device is ``meta`` and it refuses other tensors."""
    seen: list[torch.device] = []

    def collective(tensor, *args, **kwargs):
        if tensor.device.type != "meta":
            raise RuntimeError(f"emulated NCCL: tensor on {tensor.device}")
        seen.append(tensor.device)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *a: 0)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(dist, "all_reduce", collective)
    monkeypatch.setattr(distributed, "collective_device", lambda: torch.device("meta"))
    return seen


def test_helpers_put_any_tensor_on_the_group_device(emulated_nccl):
    # What the trainers' logging hands over: CPU counts and loss terms from wherever they were made.
    assert distributed.all_reduce_sum(torch.tensor(3)).device.type == "meta"
    assert distributed.all_reduce_sum(torch.tensor(0.5, dtype=torch.float64)).device.type == "meta"
    sums = distributed.all_reduce_sums(
        {"confusion": torch.zeros(3, 3, dtype=torch.int64), "sum": torch.zeros((), dtype=torch.float64)}
    )
    assert {k: (v.device.type, tuple(v.shape)) for k, v in sums.items()} == {
        "confusion": ("meta", (3, 3)),
        "sum": ("meta", ()),
    }
    assert len(emulated_nccl) == 4  # one collective per value, one per dtype of a dict


def test_a_tensor_off_the_group_device_is_a_clear_error_not_a_hang(emulated_nccl):
    # Buffers are reduced in place, so they cannot be moved: a module left on the CPU is named.
    with pytest.raises(RuntimeError, match=r"buffer running_mean: a tensor on cpu .* nccl .* meta only"):
        distributed.average_floating_buffers(nn.BatchNorm1d(2))
    assert emulated_nccl == []


def test_without_a_process_group_the_helpers_are_identities():
    value = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(value) is value
    assert distributed.all_reduce_sums({"a": value})["a"] is value
    assert distributed.all_gather_objects({"x": 1}) == [{"x": 1}]
    assert distributed.shard_indices(3) == [0, 1, 2] and distributed.is_main_process()
    assert distributed.collective_device() == torch.device("cpu")


@pytest.fixture(scope="module")
def pascal(tmp_path_factory):
    root = tmp_path_factory.mktemp("collectives")
    write_tiny_pascal(root / "PASCALContext", n_train=2, n_val=3, size=(40, 48), seed=3)
    torch.manual_seed(0)
    model = PrismMultiTask({**TINY, "img_size": (48, 64)}, dataset_tasks("pascalcontext"))
    model.save_pretrained(root / "model")
    return root


def _score(root: Path, out: Path, rank: int) -> None:
    """Validation and evaluation as one process of a group (or alone): results saved under ``out``."""
    cfg = resolved(apply_overrides(preset("tiny"), [("data", str(root / "PASCALContext"))]))
    model = PrismMultiTask.from_pretrained(root / "model")
    val_set = PascalContext(root / "PASCALContext", "val", cfg.tasks, DenseTestTransform((48, 64)))
    seen: list[int] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    scores = validate(model, val_set, cfg, torch.device("cpu"))
    (out / f"validate{rank}.json").write_text(json.dumps({"scores": scores, "images": sum(seen)}))
    result = evaluate(
        root / "model",
        "pascalcontext",
        root / "PASCALContext",
        out=out / f"eval{rank}",
        workers=1,
        img_size=(48, 64),
        save_edges=True,
        baselines=dict.fromkeys(cfg.tasks, 50.0),
    )
    (out / f"evaluate{rank}.json").write_text(json.dumps(result))


def _worker(rank: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    _score(Path(root), Path(out), rank)
    distributed.shutdown_distributed()


def test_two_processes_validate_and_evaluate_like_one_and_only_rank_0_writes_results(pascal, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "group").mkdir()
    (tmp_path / "alone").mkdir()
    mp.spawn(_worker, args=(port, str(pascal), str(tmp_path / "group")), nprocs=2, join=True)
    _score(pascal, tmp_path / "alone", 0)

    alone = json.loads((tmp_path / "alone" / "validate0.json").read_text())
    assert alone["images"] == 3
    alone = alone["scores"]
    for rank in (0, 1):  # every rank scores its part and gets the scores of the whole split
        group = json.loads((tmp_path / "group" / f"validate{rank}.json").read_text())
        assert group["images"] == 2 - rank
        group = group["scores"]
        assert group.keys() == alone.keys()
        # Batches are made of other images than alone, so float32 forwards differ in their last bits.
        for key in alone:
            assert group[key] == pytest.approx(alone[key], rel=1e-6, abs=1e-6), key
    single = json.loads((tmp_path / "alone" / "evaluate0.json").read_text())
    for rank in (0, 1):
        result = json.loads((tmp_path / "group" / f"evaluate{rank}.json").read_text())
        assert result["images"] == single["images"] == 3
        for task, scores in single["scores"].items():
            assert result["scores"][task] == pytest.approx(scores, rel=1e-6, abs=1e-6), task
        assert result["delta_m"] == pytest.approx(single["delta_m"], rel=1e-6)
    # Only rank 0 writes the results; each rank writes the edge maps of its own images, 2 + 1 of them.
    group = tmp_path / "group"
    assert (group / "eval0" / "metrics.json").is_file() and (group / "eval0" / "metrics.md").is_file()
    assert not (group / "eval1" / "metrics.json").exists() and not (group / "eval1" / "metrics.md").exists()
    edges = [sorted(p.name for p in (group / f"eval{r}" / "edge").glob("*.png")) for r in (0, 1)]
    assert len(edges[0]) == 2 and len(edges[1]) == 1 and not set(edges[0]) & set(edges[1])
    assert sorted(edges[0] + edges[1]) == sorted(
        p.name for p in (tmp_path / "alone" / "eval0" / "edge").iterdir()
    )


def test_commands_that_do_not_share_their_work_refuse_to_run_under_torchrun(monkeypatch, tmp_path):
    from prism_vfm.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match=r"prism analyze: runs in one process; launch it without torchrun"):
        main(
            [
                "analyze",
                "efficiency",
                "--checkpoint",
                str(tmp_path / "ckpt"),
                "--out",
                str(tmp_path / "figures"),
            ]
        )
    assert not (tmp_path / "figures").exists()
