"""Zero-shot protocols shipped as data (published splits, K600 novel classes, half classes), few-shot and
base-to-novel, end to end on tiny generated data sets with a tiny random model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from prism_vfm.cli import main
from prism_vfm.config import ConfigError, apply_overrides
from prism_vfm.train.checkpoint import latest_checkpoint
from prism_vfm.video.data.classes import half_classes, novel_classes, write_k600_novel
from prism_vfm.video.data.dataset import VideoDataset
from prism_vfm.video.data.fewshot import harmonic_mean
from prism_vfm.video.data.lists import read_label_csv, read_video_list, write_label_csv
from prism_vfm.video.data.synthetic import write_tiny_video_dataset
from prism_vfm.video.evaluate import load_vidprism
from prism_vfm.video.fewshot import EvalSettings, base_to_novel, few_shot
from prism_vfm.video.protocols import read_protocol, shipped_protocols
from prism_vfm.video.text import class_text_embeddings
from prism_vfm.video.train import train_video
from prism_vfm.video.train_config import preset
from prism_vfm.video.zeroshot import text_encoder_for, zero_shot
from tests.conftest import REPO_ROOT

TINY_VIEWS = ["frames=8", "size=32", "clips=1"]
NO_HUB = EvalSettings(blend="none", text_weights="none", workers=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """UCF101 layout, 4 classes: 3 training and 1 validation video each; split 2 lists one test video."""
    root = tmp_path_factory.mktemp("ucf") / "data"
    write_tiny_video_dataset(root, "ucf101", n_classes=4, per_class=4)
    lists = root / "ucfTrainTestlist"
    (lists / "testlist02.txt").write_text((lists / "testlist02.txt").read_text().splitlines()[0] + "\n")
    return root


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    train_video(tiny_cfg(data, out))
    return out


def tiny_cfg(data: Path, out: Path, *overrides):
    return apply_overrides(
        preset("tiny"), [("data.root", str(data)), ("out", str(out)), ("epochs", 1), *overrides]
    )


def test_half_class_subsets_are_distinct_halves_fixed_by_their_seed():
    for num_classes in (51, 101, 4):
        halves = [half_classes(num_classes, seed) for seed in range(10)]
        for half in halves:
            assert len(half) == len(set(half)) == num_classes // 2
            assert half == sorted(half) and all(0 <= c < num_classes for c in half)
        assert halves == [half_classes(num_classes, seed) for seed in range(10)]
        if num_classes > 4:
            assert len({tuple(h) for h in halves}) == 10
    with pytest.raises(ValueError, match="half of 1 classes"):
        half_classes(1, 0)


def test_every_shipped_protocol_is_package_data_and_reads(tmp_path):
    assert shipped_protocols() == ["half_classes", "hmdb51_3splits", "k600_novel_3splits", "ucf101_3splits"]
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert re.search(r'^prism_vfm = \[[^]]*"video/protocols/\*\.yaml"', pyproject, re.M)
    for name in ("ucf101_3splits", "hmdb51_3splits"):
        p = read_protocol(name, tmp_path)
        assert [(s.dataset, s.split) for s in p.splits] == [(name[:-8], 1), (name[:-8], 2), (name[:-8], 3)]
        assert (p.templates, p.frames, p.size, p.clips, p.crops, p.logit_scale) == (
            "ensemble_28",
            32,
            224,
            3,
            1,
            1.0,
        )
    half = read_protocol("half_classes", tmp_path)
    assert half.half_classes == list(range(10)) and half.logit_scale == 100.0
    k600 = read_protocol("k600_novel_3splits", tmp_path)
    assert [s.classes for s in k600.splits] == [str(tmp_path / f"k600_novel/split{i}.csv") for i in (1, 2, 3)]


def test_a_shipped_protocol_scores_the_published_splits_end_to_end(data, run, tmp_path):
    out = tmp_path / "zs"
    summary = zero_shot(
        run, "ucf101_3splits", root=data, overrides=TINY_VIEWS, out=out, text_weights="none",
        blend="none", workers=0,
    )  # fmt: skip
    assert [s["split"] for s in summary["splits"]] == [1, 2, 3]
    assert [s["videos"] for s in summary["splits"]] == [4, 1, 4]  # split 2's own test list
    assert summary["splits"][0]["classes"] == [f"Action{c:02d}" for c in range(4)]
    assert summary["protocol"]["name"] == "ucf101_3splits" and summary["overrides"] == TINY_VIEWS
    assert summary["protocol"]["frames"] == 8 and len(summary["template_strings"]) == 28
    recorded = json.loads((out / "metrics.json").read_text())
    assert recorded["protocol"]["splits"][1]["split"] == 2 and recorded["top1"] == summary["top1"]
    assert "frames=8" in (out / "metrics.md").read_text()
    for split in (1, 2, 3):
        assert (out / f"split{split}" / "metrics.json").is_file()


def test_the_hmdb51_protocol_reads_its_split_files_from_the_command_line(run, tmp_path, capsys):
    data = tmp_path / "hmdb"
    write_tiny_video_dataset(data, "hmdb51", n_classes=3, per_class=2)
    split3 = data / "testTrainMulti_7030_splits" / "action_01_test_split3.txt"
    split3.write_text(split3.read_text().replace(" 2\n", " 0\n"))  # split 3 tests no video of class 1
    main(
        ["video", "zeroshot", "--checkpoint", str(run), "--protocol", "hmdb51_3splits", "--root", str(data),
         "--out", str(tmp_path / "zs"), "--text-weights", "none", "--blend", "none", "--workers", "0",
         *(a for o in TINY_VIEWS for a in ("--set", o))]
    )  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert [s["videos"] for s in printed["splits"]] == [3, 3, 2]
    recorded = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert recorded["splits"][0]["classes"] == ["action_00", "action_01", "action_02"]
    assert recorded["protocol"]["name"] == "hmdb51_3splits"


def test_the_half_class_protocol_scores_each_seed_on_its_half_by_100_cos(data, run, tmp_path):
    torch.manual_seed(0)
    summary = zero_shot(
        run, "half_classes", root=data, overrides=[*TINY_VIEWS, "half_classes=[0, 1, 2]"],
        out=tmp_path / "half", text_weights="none", blend="none", workers=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = load_vidprism(run)
    encoder = text_encoder_for(model, "none")
    names = read_label_csv(data / "labels.csv")
    from prism_vfm.video.prompts import ENSEMBLE_28

    class_text = class_text_embeddings(encoder, names, ENSEMBLE_28)
    samples = read_video_list(data / "val.txt", 4, root=data / "videos")
    views = VideoDataset(data / "videos", samples, "test", 8, 32, 32)
    assert [s["seed"] for s in summary["splits"]] == [0, 1, 2]
    for row in summary["splits"]:
        ids = half_classes(4, row["seed"])
        assert row["classes"] == [names[c] for c in ids] and row["videos"] == 2
        hits = 0
        for i, sample in enumerate(samples):
            if sample.label in ids:
                probs = model.zero_shot(views[i]["video"][None], class_text=class_text[ids])
                hits += int(probs.argmax(-1).item() == ids.index(sample.label))
        assert row["top1"] == pytest.approx(100.0 * hits / 2)
    top1 = [row["top1"] for row in summary["splits"]]
    assert summary["top1"]["mean"] == pytest.approx(sum(top1) / 3)
    assert summary["protocol"]["logit_scale"] == 100.0
    assert "100 · cos" in (tmp_path / "half" / "metrics.md").read_text()


def _kinetics_csvs(tmp_path: Path, novel: int) -> tuple[Path, Path]:
    k400 = [f"action {i}" for i in range(400)]
    # Kinetics-600 spells some shared classes differently (case, underscores): they are not novel
    k600 = [n.upper() if i % 7 == 0 else n.replace(" ", "_") for i, n in enumerate(k400)]
    k600 += [f"new action {i}" for i in range(novel)]
    write_label_csv(tmp_path / "k400.csv", k400)
    write_label_csv(tmp_path / "k600.csv", k600)
    return tmp_path / "k400.csv", tmp_path / "k600.csv"


def test_k600_novel_splits_are_drawn_from_the_users_label_csvs(tmp_path):
    k400, k600 = _kinetics_csvs(tmp_path, 220)
    assert novel_classes(read_label_csv(k400), read_label_csv(k600)) == [
        f"new action {i}" for i in range(220)
    ]
    protocol = write_k600_novel(k400, k600, tmp_path / "a")
    write_k600_novel(k400, k600, tmp_path / "b")
    splits = []
    for i in (1, 2, 3):
        split = read_label_csv(tmp_path / "a" / f"split{i}.csv")
        assert len(set(split)) == 160 and set(split) <= {f"new action {j}" for j in range(220)}
        assert split == read_label_csv(tmp_path / "b" / f"split{i}.csv")  # the seeds fix the draw
        splits.append(split)
    assert splits[0] != splits[1] != splits[2]
    assert len(read_label_csv(tmp_path / "a" / "novel_classes.csv")) == 220
    text = protocol.read_text()
    assert "seeds [0, 1, 2]" in text and "permutation(220)[:160]" in text
    read = read_protocol(protocol, tmp_path)
    assert [s.classes for s in read.splits] == [
        str((tmp_path / "a" / f"split{i}.csv").resolve()) for i in (1, 2, 3)
    ]
    with pytest.raises(FileExistsError, match="already holds novel_classes.csv"):
        write_k600_novel(k400, k600, tmp_path / "a")


def test_a_novel_count_other_than_220_is_an_error_naming_both_files(tmp_path, capsys):
    k400, k600 = _kinetics_csvs(tmp_path, 200)
    with pytest.raises(ValueError, match=r"k600.csv has 200 classes absent from .*k400.csv, expected 220"):
        write_k600_novel(k400, k600, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    argv = ["video", "k600-novel", "--k400-labels", str(k400), "--k600-labels", str(k600)]
    main([*argv, "--out", str(tmp_path / "any"), "--novel-count", "0"])
    assert len(read_label_csv(tmp_path / "any" / "split1.csv")) == 160


def test_k600_novel_protocol_scores_only_each_splits_classes(data, run, tmp_path):
    (tmp_path / "k600_novel").mkdir()
    write_label_csv(tmp_path / "k600_novel" / "split1.csv", ["Action03", "Action01"])
    protocol = {
        "videos": str(data / "videos"),
        "splits": [
            {
                "list": str(data / "val.txt"),
                "labels": str(data / "labels.csv"),
                "classes": "k600_novel/split1.csv",
            }
        ],
        "frames": 8,
        "size": 32,
        "templates": "single",
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(protocol))
    summary = zero_shot(run, tmp_path / "p.yaml", text_weights="none", blend="none", workers=0)
    assert summary["splits"][0]["classes"] == ["Action03", "Action01"] and summary["splits"][0]["videos"] == 2
    write_label_csv(tmp_path / "k600_novel" / "split1.csv", ["Action03", "Dancing"])
    with pytest.raises(
        ValueError, match=r"split1.csv, class 1 'Dancing': not a class of the label CSV .*labels.csv"
    ):
        zero_shot(run, tmp_path / "p.yaml", text_weights="none", blend="none", workers=0)


def test_bad_protocol_input_is_one_line_naming_what_is_wrong(data, run, tmp_path, capsys):
    def fails(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err, err
        return err

    zs = ["video", "zeroshot", "--checkpoint", str(run), "--blend", "none", "--text-weights", "none"]
    err = fails([*zs, "--protocol", "ucf_zeroshot", "--root", str(data)])
    assert "unknown protocol 'ucf_zeroshot'" in err and "ucf101_3splits" in err and "half_classes" in err
    assert "give root" in fails([*zs, "--protocol", "ucf101_3splits"])
    broken = tmp_path / "broken"
    shutil.copytree(data / "ucfTrainTestlist", broken / "ucfTrainTestlist")
    (broken / "videos").symlink_to(data / "videos")
    (broken / "ucfTrainTestlist" / "testlist03.txt").unlink()
    err = fails(
        [
            *zs,
            "--protocol",
            "ucf101_3splits",
            "--root",
            str(broken),
            "--set",
            "frames=8",
            "--set",
            "size=32",
            "--workers",
            "0",
        ]
    )
    assert "testlist03.txt" in err and "does not exist" in err
    err = fails([*zs, "--protocol", "ucf101_3splits", "--root", str(data), "--set", "views=3"])
    assert "unknown configuration key views" in err
    fs = ["video", "fewshot", "--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "fs")]
    err = fails([*fs, "--shots", "2", "4", "--blend", "none"])
    assert re.search(r"train.txt: class 'Action00' has 3 training videos, fewer than 4 shots", err), err
    assert not (tmp_path / "fs" / "runs").exists()  # checked before any training


def test_few_shot_trains_each_draw_once_and_reports_shots_by_seeds(data, tmp_path, capsys):
    out = tmp_path / "fewshot"
    argv = [
        "video", "fewshot", "--preset", "tiny", "--data", str(data), "--out", str(out), "--set", "epochs=1",
        "--shots", "1", "2", "--seeds", "0", "1", "--blend", "none", "--workers", "0",
    ]  # fmt: skip
    main(argv)
    summary = json.loads((out / "fewshot.json").read_text())
    assert set(summary["top1"]) == {"1", "2"} and set(summary["top1"]["2"]) == {"0", "1"}
    for k in (1, 2):
        for seed in (0, 1):
            samples = read_video_list(out / "lists" / f"train_{k}shot_seed{seed}.txt")
            assert sorted(s.label for s in samples) == sorted(list(range(4)) * k)
            report = out / "evals" / f"{k}shot_seed{seed}"
            result = json.loads(next(report.glob("*/metrics.json")).read_text())
            assert summary["top1"][str(k)][str(seed)] == result["scores"]["top1"]
        values = list(summary["top1"][str(k)].values())
        assert summary["top1_mean_std"][str(k)]["mean"] == pytest.approx(sum(values) / 2)
    table = (out / "fewshot.md").read_text()
    assert "| shots | seed 0 | seed 1 | mean ± std |" in table
    assert re.search(r"^\| 1 \| [\d.]+ \| [\d.]+ \| [\d.]+ ± [\d.]+ \|$", table, re.M)
    assert re.search(r"^\| 2 \| [\d.]+ \| [\d.]+ \| [\d.]+ ± [\d.]+ \|$", table, re.M)
    assert read_video_list(out / "lists" / "train_2shot_seed0.txt") != read_video_list(
        out / "lists" / "train_2shot_seed1.txt"
    )

    # Again: the finished runs and their evaluations are reused, not retrained or overwritten.
    checkpoint = latest_checkpoint(out / "runs" / "2shot_seed1")
    assert checkpoint is not None
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    main(argv)
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()} == stamps
    assert json.loads((out / "fewshot.json").read_text())["top1"] == summary["top1"]
    # ... and neither a finished run nor its evaluation is silently reused with other settings
    with pytest.raises(ValueError, match=r"1shot_seed0/step_\w+ was scored with other settings \(views"):
        few_shot(tiny_cfg(data, tmp_path / "x"), out, shots=[1], seeds=[0], settings=EvalSettings(
            clips=2, blend="none", workers=0))  # fmt: skip
    with pytest.raises(ConfigError, match=r"2shot_seed0 was trained with other settings \(lr"):
        few_shot(tiny_cfg(data, tmp_path / "x", ("lr", 1e-2)), out, shots=[2], seeds=[0], settings=NO_HUB)


def test_few_shot_resumes_a_run_that_stopped_early_and_scores_its_last_checkpoint(data, tmp_path):
    out = tmp_path / "fewshot"
    few_shot(tiny_cfg(data, tmp_path / "x", ("max_steps", 1)), out, shots=[2], seeds=[0], settings=NO_HUB)
    run = out / "runs" / "2shot_seed0"
    first = latest_checkpoint(run)
    assert first is not None and first.name.endswith("1")
    summary = few_shot(tiny_cfg(data, tmp_path / "x"), out, shots=[2], seeds=[0], settings=NO_HUB)
    last = latest_checkpoint(run)
    assert last is not None and last != first and first.is_dir()  # resumed: the earlier step is kept
    evals = sorted(p.name for p in (out / "evals" / "2shot_seed0").iterdir())
    assert evals == sorted([first.name, last.name])
    scored = json.loads((out / "evals" / "2shot_seed0" / last.name / "metrics.json").read_text())
    assert summary["top1"]["2"]["0"] == scored["scores"]["top1"]


def test_base_to_novel_trains_on_half_the_classes_and_scores_the_rest_by_text(data, tmp_path):
    out = tmp_path / "b2n"
    summary = base_to_novel(tiny_cfg(data, tmp_path / "unused"), out, shots=2, seeds=[0, 1], settings=NO_HUB)
    names = read_label_csv(data / "labels.csv")
    assert [r["seed"] for r in summary["seeds_results"]] == [0, 1]
    for row in summary["seeds_results"]:
        seed = row["seed"]
        assert row["base_classes"] == [names[c] for c in half_classes(4, seed)]
        assert sorted(row["base_classes"] + row["novel_classes"]) == names
        assert row["harmonic_mean"] == pytest.approx(harmonic_mean(row["base"], row["novel"]))
        run = out / "runs" / f"seed{seed}"
        assert load_vidprism(run).head.cfg.num_classes == 2  # trained on the base classes only
        assert read_label_csv(out / "lists" / f"seed{seed}" / "base_labels.csv") == row["base_classes"]
        assert len(read_video_list(out / "lists" / f"seed{seed}" / "base_train_2shot.txt")) == 4
        novel = json.loads(next((out / "evals" / f"seed{seed}" / "novel").glob("*/metrics.json")).read_text())
        assert novel["splits"][0]["classes"] == row["novel_classes"] and novel["splits"][0]["videos"] == 2
        assert novel["top1"]["mean"] == row["novel"]
        base = json.loads(next((out / "evals" / f"seed{seed}" / "base").glob("*/metrics.json")).read_text())
        assert base["scores"]["top1"] == row["base"] and base["scores"]["videos"] == 2
    hm = [r["harmonic_mean"] for r in summary["seeds_results"]]
    assert summary["harmonic_mean"]["mean"] == pytest.approx(sum(hm) / 2)
    table = (out / "base2novel.md").read_text()
    assert "| seed | base | novel | HM |" in table and table.count("\n| 0 |") + table.count("\n| 1 |") == 2
    assert "| mean ± std |" in table
