"""prism video demo: the quick run leaves every artefact with sensible content; outputs are its own."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from prism_vfm.cli import main
from prism_vfm.video.demo.pipeline import (
    EXPERT_RUNS,
    FINETUNED,
    MARKER,
    RUNS,
    prepare_output,
    run_video_demo,
)

FIGURES = ("group_accuracy", "stream_ablation", "gate_mass", "examples")
SECTIONS = (
    "## Accuracy by head",
    "## Motion accuracy per motion group",
    "## What the numbers say",
    "## Do the experts divide the work?",
    "## Example test clips",
    "## What this demo can show, and what it cannot",
    "## Time per stage",
)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_demo")
    return run_video_demo(root / "run", quick=True, seed=0, cache_dir=root / "cache", finetune=True)


def _scores(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _scores(value)
    elif isinstance(tree, float):
        yield tree


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_video_demo_scores_every_head_and_times_every_stage(quick):
    summary = json.loads((quick.out / "summary.json").read_text())
    assert set(summary["results"]) == {*RUNS, FINETUNED}  # the heads, and VidPrism trained end to end
    for name, run in summary["results"].items():
        scores = list(_scores(run["mean"]))
        assert scores and all(0.0 <= s <= 100.0 for s in scores), name
        assert set(run["mean"]["motion_by_group"]) <= {
            "static",
            "translation",
            "scale",
            "visibility",
            "blink",
            "rotation",
        }
    stages = summary["timings_s"]
    for stage in (
        *("data", "image-text model", "frame features", "runs and evaluation"),
        *("fine-tuned encoder run", "report", "total"),
    ):
        assert stages[stage] >= 0.0
    assert stages["total"] >= sum(stages[s] for s in ("data", "frame features", "runs and evaluation"))
    for name in EXPERT_RUNS:
        analysis = summary["analysis"][name][0]
        assert set(analysis) >= {"accuracy", "stream_ablation", "gate_mass_per_token", "probes", "reversal"}
        # DBI off: the head cannot tell a clip from its time reversal
        if name == "vidprism_no_dbi":
            assert analysis["reversal"]["flip"] == 0.0 and analysis["reversal"]["same"] == 100.0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_video_demo_report_has_every_section_and_valid_figures(quick):
    report = (quick.out / "report.md").read_text()
    for section in SECTIONS:
        assert section in report
    for name in FIGURES:
        path = quick.out / "figures" / f"{name}.png"
        assert path.stat().st_size > 1000 and f"figures/{name}.png" in report
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100
    for spec in RUNS.values():
        assert spec.label in report
    # The stream-ablation table: the full read-out and one row per hidden expert, with numbers.
    table = [line for line in report.splitlines() if line.startswith(("| none |", "| expert "))]
    assert len(table) == 5 and all(line.count("|") == 9 for line in table)
    assert (quick.out / "data" / "train.txt").is_file() and (quick.out / "features" / "classes.csv").is_file()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_video_analyze_command_reads_a_demo_run(quick, tmp_path, capsys):
    run = quick.out / "runs" / "vidprism" / "seed0"
    main(["video", "analyze", str(run), "--features", str(quick.out / "features"), "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert saved["head"] == "vidprism" and (tmp_path / "stream_ablation.png").stat().st_size > 1000
    assert '"accuracy"' in capsys.readouterr().out


def test_video_demo_refuses_a_folder_holding_outputs_another_program_wrote(tmp_path):
    (tmp_path / "report.md").write_text("mine")
    with pytest.raises(FileExistsError, match="no video demo marker"):
        prepare_output(tmp_path)
    assert (tmp_path / "report.md").read_text() == "mine"


def test_a_video_demo_replaces_only_what_a_previous_video_demo_wrote(tmp_path):
    prepare_output(tmp_path)
    (tmp_path / "report.md").write_text("old report")
    (tmp_path / "notes.txt").write_text("keep")
    prepare_output(tmp_path)
    assert not (tmp_path / "report.md").exists() and (tmp_path / "notes.txt").read_text() == "keep"
    assert (tmp_path / MARKER).is_file()


def test_video_demo_refuses_a_negative_seed(tmp_path):
    with pytest.raises(SystemExit, match="--seed"):
        main(["video", "demo", "--quick", "--seed", "-1", "--out", str(tmp_path)])


def _spread(*values):
    from prism_vfm.video.demo.pipeline import spread

    return spread(list(values))


def test_report_sentences_follow_the_numbers():
    from prism_vfm.video.demo.report import compare

    above = compare(_spread(90.0, 92.0, 94.0), _spread(50.0, 55.0, 60.0), "A", "B", "reversal pairs")
    assert "A scores 92.0 ± 2.0 and B 55.0 ± 5.0 (+37.0 points; above it in every seed" in above
    overlap = compare(_spread(60.0, 70.0, 80.0), _spread(65.0, 66.0, 67.0), "A", "B", "motion")
    assert "overlap" in overlap and "+4.0 points" in overlap
    below = compare(_spread(10.0, 11.0), _spread(20.0, 30.0), "A", "B", "motion")
    assert "below it in every seed" in below
    assert "one seed only" in compare(_spread(70.0), _spread(50.0), "A", "B", "motion")


def test_the_probe_verdict_needs_a_gap_in_every_seed():
    from prism_vfm.video.demo.report import _probe_sentence

    def analysis(shape, group):
        return {"probes": {"accuracy": {"shape": shape, "group": group}}}

    rates = ["rate 2", "rate 4", "rate 8", "rate 16"]
    paper = analysis([50, 50, 90, 90], [90, 90, 50, 50])  # slow read shape, fast read the motion group
    reverse = analysis([90, 90, 50, 50], [50, 50, 90, 90])
    assert "appears in every seed" in _probe_sentence([paper, paper], rates)
    assert "does not appear" in _probe_sentence([reverse, reverse], rates)
    assert "only in part" in _probe_sentence([paper, analysis([50, 50, 90, 90], [50, 50, 90, 90])], rates)
    assert "one seed cannot" in _probe_sentence([paper], rates)
