"""``prism video evaluate``: views averaged as released, top-k, the report, sharding over processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from prism_vfm.config import apply_overrides
from prism_vfm.train.distributed import shutdown_distributed
from prism_vfm.video.data.dataset import VideoDataset
from prism_vfm.video.data.lists import VideoSample, read_video_list
from prism_vfm.video.data.synthetic import write_tiny_video_dataset
from prism_vfm.video.evaluate import evaluate_video, load_vidprism
from prism_vfm.video.metrics import ClassificationMeter, average_views
from prism_vfm.video.train import train_video
from prism_vfm.video.train_config import preset
from tests.video_fixtures import folder, inputs, reference


def test_view_averaging_and_top_k_equal_the_released_validate():
    views, labels = inputs("train_utils")["views.logits"], inputs("train_utils")["views.labels"]
    ref = reference("train_utils")
    expected = json.loads((folder("train_utils") / "reference.json").read_text())["view_averaging"]
    probs = average_views(views, "logits")
    torch.testing.assert_close(probs, ref["views.softmax"], rtol=0, atol=1e-6)
    assert torch.equal(probs.topk(5, dim=-1).indices, ref["views.top5_pred"])
    meter = ClassificationMeter(10)
    for part in (slice(0, 4), slice(4, 7)):  # the release's two loader batches
        meter.update(probs[part], labels[part])
    scores = meter.scores()
    for script in ("test.py", "test_zeroshot.py"):
        assert scores["top1"] == pytest.approx(expected[script]["top1_percent"], abs=1e-9)
        assert scores["top5"] == pytest.approx(expected[script]["top5_percent"], abs=1e-9)
    # MoTE's way averages probabilities: other scores, still rows of a distribution
    soft = average_views(views, "softmax")
    assert not torch.allclose(soft, probs) and torch.allclose(soft.sum(-1), torch.ones(7))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_tiny_video_dataset(root / "data", "ucf101", n_classes=3, per_class=3)
    cfg = apply_overrides(
        preset("tiny"), [("data.root", str(root / "data")), ("out", str(root / "run")), ("epochs", 2)]
    )
    train_video(cfg)
    return root


def _evaluate(root: Path, out: Path | None, average: str = "logits") -> dict:
    data = root / "data"
    return evaluate_video(
        root / "run",
        data / "val.txt",
        data / "labels.csv",
        data / "videos",
        dataset="ucf101",
        out=out,
        num_frames=8,
        size=32,
        test_clips=2,
        test_crops=3,
        average=average,
        blend="none",
        workers=0,
    )


def test_evaluation_scores_the_averaged_views_and_writes_its_report(trained, tmp_path):
    result = _evaluate(trained, tmp_path / "report")
    data = trained / "data"
    samples = read_video_list(data / "val.txt", 3, root=data / "videos")
    views = VideoDataset(data / "videos", samples, "test", 8, 32, 32, test_clips=2, test_crops=3)
    model = load_vidprism(trained / "run")
    probs = torch.cat([model.classify(views[i]["video"][None]) for i in range(len(views))])
    labels = torch.tensor([s.label for s in samples])
    top1 = 100.0 * float((probs.argmax(-1) == labels).float().mean())
    assert result["scores"]["top1"] == pytest.approx(top1)
    assert result["views"] == {"clips": 2, "crops": 3, "frames": 8, "size": 32}
    for name in ("metrics.json", "metrics.md", "per_class.csv", "confusion.png"):
        assert (tmp_path / "report" / name).is_file(), name
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["scores"] == result["scores"] and saved["blend"] == "none"
    assert len(saved["per_class"]) == 3


def _worker(rank: int, port: int, root: str, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    result = _evaluate(Path(root), Path(out))
    Path(out, f"scores{rank}.json").write_text(json.dumps(result["scores"]))
    shutdown_distributed()


def test_two_processes_score_the_list_as_one(trained, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "two").mkdir()
    mp.spawn(_worker, args=(port, str(trained), str(tmp_path / "two")), nprocs=2, join=True)
    single = _evaluate(trained, None)["scores"]
    for rank in (0, 1):
        assert json.loads((tmp_path / "two" / f"scores{rank}.json").read_text()) == single
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["scores"] == single


def test_cli_evaluates_a_run(trained, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "prism_vfm.cli",
        "video",
        "evaluate",
        "--checkpoint",
        str(trained / "run"),
        "--data",
        str(trained / "data"),
        "--frames",
        "8",
        "--size",
        "32",
        "--crops",
        "3",
        "--blend",
        "none",
        "--workers",
        "0",
        "--out",
        str(tmp_path / "cli"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["views"]["crops"] == 3
    assert (tmp_path / "cli" / "metrics.md").is_file()


def test_the_test_time_blend_mixes_in_the_original_tower(trained, tmp_path):
    from safetensors.torch import save_file

    from prism_vfm.video.evaluate import apply_blend
    from prism_vfm.video.model import blend

    model = load_vidprism(trained / "run")
    original = {k: torch.randn_like(v) for k, v in model.backbone.tower.state_dict().items()}
    save_file(original, str(tmp_path / "clip.safetensors"))
    before = {k: v.clone() for k, v in model.backbone.tower.state_dict().items()}
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    apply_blend(model, str(tmp_path / "clip.safetensors"))
    for key, value in model.backbone.tower.state_dict().items():
        assert torch.equal(value, blend(before[key], original[key])), key
    for key, value in model.head.state_dict().items():
        assert torch.equal(value, head[key]), key


def _protocol(trained: Path, tmp_path: Path, **extra) -> Path:
    data = trained / "data"
    protocol = {
        "name": "tiny_two_splits",
        "videos": str(data / "videos"),
        "splits": [
            {"list": str(data / "val.txt"), "labels": str(data / "labels.csv")},
            {"list": str(data / "train.txt"), "labels": str(data / "labels.csv")},
        ],
        "templates": ["a video of {}.", "a person doing {}."],
        "frames": 8,
        "size": 32,
        "clips": 2,
        "crops": 1,
        **extra,
    }
    path = tmp_path / "protocol.yaml"
    path.write_text(yaml.safe_dump(protocol))
    return path


def test_zero_shot_scores_each_split_by_text_similarity_and_reports_mean_and_std(trained, tmp_path):
    from prism_vfm.video.text import class_text_embeddings
    from prism_vfm.video.zeroshot import text_encoder_for, zero_shot

    protocol = _protocol(trained, tmp_path)
    torch.manual_seed(0)
    summary = zero_shot(
        trained / "run", protocol, out=tmp_path / "zs", text_weights="none", blend="none", workers=0
    )
    torch.manual_seed(0)
    model = load_vidprism(trained / "run")
    encoder = text_encoder_for(model, "none")
    data = trained / "data"
    names = ["Action00", "Action01", "Action02"]
    class_text = class_text_embeddings(encoder, names, ["a video of {}.", "a person doing {}."])
    top1 = []
    for name in ("val.txt", "train.txt"):
        samples = read_video_list(data / name, 3, root=data / "videos")
        views = VideoDataset(data / "videos", samples, "test", 8, 32, 32, test_clips=2)
        probs = torch.cat(
            [model.zero_shot(views[i]["video"][None], class_text=class_text) for i in range(len(views))]
        )
        labels = torch.tensor([s.label for s in samples])
        top1.append(100.0 * float((probs.argmax(-1) == labels).float().mean()))
    assert [s["top1"] for s in summary["splits"]] == pytest.approx(top1)
    assert summary["top1"]["mean"] == pytest.approx(sum(top1) / 2)
    assert summary["protocol"]["clips"] == 2 and summary["protocol"]["templates"][0] == "a video of {}."
    for name in ("metrics.json", "metrics.md", "split1/metrics.json", "split2/confusion.png"):
        assert (tmp_path / "zs" / name).is_file(), name


def test_a_protocol_file_with_an_unknown_key_is_named(trained, tmp_path):
    from prism_vfm.config import ConfigError
    from prism_vfm.video.protocols import read_protocol

    with pytest.raises(ConfigError, match="unknown configuration key view"):
        read_protocol(_protocol(trained, tmp_path, view=3))


def test_k_shot_lists_hold_k_videos_of_every_class_and_depend_only_on_the_seed():
    from prism_vfm.video.data.fewshot import harmonic_mean, k_shot

    samples = [VideoSample(f"c{c}/v{v}.avi", c) for c in range(4) for v in range(6)]
    two = k_shot(samples, 2, seed=0)
    assert sorted(s.label for s in two) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert two == k_shot(samples, 2, seed=0) and two != k_shot(samples, 2, seed=1)
    assert [samples.index(s) for s in two] == sorted(samples.index(s) for s in two)
    with pytest.raises(ValueError, match="class 0 has 6 videos, fewer than 7 shots"):
        k_shot(samples, 7, seed=0)
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140) and harmonic_mean(0.0, 50.0) == 0.0
