"""prism evaluate: every metric (odsF too), Δm, JSON and Markdown, for our checkpoints and official files."""

from __future__ import annotations

import json

import pytest
import torch

from prism_vfm import PrismMultiTask
from prism_vfm.compat.official import ours_to_official
from prism_vfm.data.registry import backbone_name, dataset_tasks, get_dataset
from prism_vfm.data.tiny_dense import write_tiny_nyud, write_tiny_pascal
from prism_vfm.evaluate import evaluate
from prism_vfm.metrics.multitask import delta_m
from prism_vfm.models.load import load
from tests.tiny import TINY


def tiny_model(dataset: str, **over) -> PrismMultiTask:
    torch.manual_seed(0)
    return PrismMultiTask({**TINY, "img_size": (48, 64), **over}, dataset_tasks(dataset)).eval()


@pytest.mark.parametrize("dataset, writer", [("pascalcontext", write_tiny_pascal), ("nyud", write_tiny_nyud)])
def test_evaluate_writes_all_metrics_and_delta_m(tmp_path, dataset, writer):
    root = tmp_path / "data"
    writer(root, n_train=2, n_val=3, size=(40, 48), seed=1)
    model = tiny_model(dataset)
    model.save_pretrained(tmp_path / "ckpt")
    baselines = dict.fromkeys(dataset_tasks(dataset), 50.0)
    result = evaluate(
        tmp_path / "ckpt",
        dataset,
        root,
        out=tmp_path / "eval",
        workers=1,
        img_size=(48, 64),
        save_edges=True,
        baselines=baselines,
    )
    assert result["images"] == 3
    assert set(result["scores"]) == set(dataset_tasks(dataset))
    edge = result["scores"]["edge"]
    assert {"odsF", "oisF", "AP"} <= set(edge) and 0 <= edge["odsF"] <= 100
    assert result["delta_m"] == pytest.approx(delta_m(result["scores"], baselines))
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["delta_m"] == pytest.approx(result["delta_m"])
    assert "Δm" in (tmp_path / "eval" / "metrics.md").read_text()
    assert len(list((tmp_path / "eval" / "edge").glob("*.png"))) == 3


def test_evaluate_accepts_an_official_stage2_file(tmp_path):
    root = tmp_path / "data"
    write_tiny_pascal(root, n_train=2, n_val=2, size=(40, 48), seed=2)
    # Official files record neither the head count nor top-k: a standard width and the released top-3.
    model = tiny_model("pascalcontext", embed_dim=192, num_heads=3, top_k=3)
    state = {"backbone." + k: v for k, v in ours_to_official(model.student).items()}
    state.update({f"heads.{k}": v for k, v in model.heads.state_dict().items()})
    path = tmp_path / "official_stage2.pth"
    torch.save({"model": state}, path)
    loaded, report = load(path, img_size=(48, 64), multitask=True)
    assert report.kind == "official Stage-2 .pth" and "task_composer_weights" in report.ignored
    x = torch.randn(1, 3, 48, 64)
    for task, out in model(x).predictions.items():
        torch.testing.assert_close(loaded(x).predictions[task], out, rtol=1e-5, atol=1e-5)
    official = evaluate(path, "pascalcontext", root, workers=1, img_size=(48, 64), baselines={})
    assert set(official["scores"]) == set(dataset_tasks("pascalcontext"))
    assert official["delta_m"] is None


def test_delta_m_baselines_follow_the_backbone(tmp_path, monkeypatch):
    """Without baselines, Δm uses the published ones of the model's backbone; a backbone that has none
    is an error naming it, raised before any image is read."""
    import prism_vfm.evaluate as ev

    tiny_model("pascalcontext").save_pretrained(tmp_path / "tiny")
    with pytest.raises(ValueError, match="no single-task baselines for a ViT of width 32 and depth 4"):
        evaluate(tmp_path / "tiny", "pascal", tmp_path / "no_data", img_size=(48, 64))

    seen = {}

    def fake_delta_m(scores, baselines):
        seen.update(baselines)
        return 0.0

    monkeypatch.setattr(ev, "delta_m", fake_delta_m)
    widths = []
    monkeypatch.setattr(ev, "backbone_name", lambda w, d: widths.append((w, d)) or "vit_l")
    root = tmp_path / "data"
    write_tiny_pascal(root, n_train=1, n_val=1, size=(40, 48), seed=3)
    evaluate(tmp_path / "tiny", "pascalcontext", root, workers=1, img_size=(48, 64))
    assert widths == [(32, 4)]
    pascal = get_dataset("pascalcontext")
    assert seen == pascal.baselines_for("vit_l") != pascal.baselines_for("vit_b")
    assert (backbone_name(768, 12), backbone_name(1024, 24)) == ("vit_b", "vit_l")


def test_evaluate_scores_edges_with_each_matcher(tmp_path):
    root = tmp_path / "data"
    write_tiny_nyud(root, n_train=2, n_val=2, size=(40, 48), seed=3)
    tiny_model("nyud").save_pretrained(tmp_path / "ckpt")
    edge = {
        matcher: evaluate(
            tmp_path / "ckpt", "nyud", root, workers=1, img_size=(48, 64), matcher=matcher, baselines={}
        )["scores"]["edge"]
        for matcher in ("fast", "maximum", "bsds")
    }
    # The fast matcher computes the BSDS matcher's assignment; a maximum matching is never smaller than it,
    # and differs from it by a pixel or two.
    for key in ("odsF", "oisF", "AP"):
        assert edge["fast"][key] == edge["bsds"][key]
    assert edge["bsds"]["odsF"] <= edge["maximum"]["odsF"] + 1e-9
    assert edge["maximum"]["odsF"] == pytest.approx(edge["bsds"]["odsF"], abs=2.0)
    with pytest.raises(ValueError, match="unknown boundary matcher 'csa'"):
        evaluate(tmp_path / "ckpt", "nyud", root, workers=1, img_size=(48, 64), matcher="csa", baselines={})
