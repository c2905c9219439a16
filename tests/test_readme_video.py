"""The README's VidPrism training and evaluation commands are true: its list preparation writes each data
set's lists from the published files, and every command runs on tiny generated data sets in those layouts
(released presets through ``--dry-run``, which reads the config and every list; evaluations with tiny
frame sizes on tiny runs standing where the commands expect theirs)."""

from __future__ import annotations

import re
import shlex
import shutil

import pytest

from prism_vfm.cli import main
from prism_vfm.config import apply_overrides
from prism_vfm.video.data.synthetic import write_tiny_video_dataset
from prism_vfm.video.train import train_video
from prism_vfm.video.train_config import preset
from tests.conftest import REPO_ROOT

SETS = {"k400": "k400", "ucf101": "ucf101", "hmdb51": "hmdb51", "ssv2": "ssv2"}  # folder: layout
LISTS = ("train.txt", "val.txt", "labels.csv")


def _section() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index("## VidPrism: training and evaluation")
    return text[start : text.index("\n## ", start + 1)]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", _section(), re.S)


def _commands(block: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    for folder, layout in SETS.items():
        write_tiny_video_dataset(root / "data" / folder, layout, n_classes=3, per_class=3)
    return root


def test_the_list_preparation_writes_every_data_sets_lists_from_its_published_files(workspace, monkeypatch):
    (prepare,) = _blocks("python")
    monkeypatch.chdir(workspace)
    expected = {}
    for folder in SETS:
        for name in LISTS:
            path = workspace / "data" / folder / name
            expected[path] = path.read_text()
            path.unlink()
    exec(compile(prepare, "README.md", "exec"), {})
    for path, text in expected.items():
        assert path.read_text() == text, path


@pytest.mark.timeout(600)
def test_every_video_command_runs_on_tiny_data_sets_in_its_layout(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    for folder in SETS:  # the runs the commands start from or evaluate, trained on the tiny preset
        cfg = apply_overrides(
            preset("tiny"),
            [
                ("data.root", f"data/{folder}"),
                ("out", f"runs/{folder}_b16"),
                ("epochs", 2),
                ("data.num_frames", 8),
            ],
        )
        train_video(cfg)
    commands = [c for block in _blocks("bash") for c in _commands(block)]
    assert (
        sum("video train" in c for c in commands) >= 6 and sum("video evaluate" in c for c in commands) >= 4
    )
    ran = set()
    for command in commands:
        command = re.sub(r"\$\(cat ([^)]+)\)", lambda m: (workspace / m[1]).read_text().strip(), command)
        argv = shlex.split(command)
        if argv[:2] == ["python", "-c"]:
            exec(argv[2], {})
            continue
        argv = argv[argv.index("prism_vfm.cli") + 1 :] if argv[0] == "torchrun" else argv[1:]
        assert argv[0] == "video" and argv[1] in ("train", "evaluate"), command
        tiny = "tiny" in argv
        if argv[1] == "train":
            argv += ["--set", "epochs=2"] if tiny else ["--dry-run"]
        elif not tiny and "--size" not in argv:
            argv += ["--frames", "8", "--size", "32", "--blend", "none", "--workers", "0"]
        main(argv)
        printed = capsys.readouterr().out
        if "--dry-run" in argv:
            data = argv[argv.index("--data") + 1]
            assert re.match(
                rf"{'ssv2' if 'ssv2' in data else data.split('/')[1]}: 3 classes, 6 training", printed
            )
        ran.add((argv[1], argv[argv.index("--data") + 1]))
    assert {d for kind, d in ran if kind == "train"} >= {f"data/{f}" for f in SETS}
    assert {d for kind, d in ran if kind == "evaluate"} >= {f"data/{f}" for f in SETS}
    assert (workspace / "runs/k400_b16/eval_4x3/metrics.json").is_file()
    shutil.rmtree(workspace / "runs")
