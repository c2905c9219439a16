"""Typed configuration: YAML and overrides set only existing keys, with values of the right type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from prism_vfm.config import ConfigError, apply_overrides, load_yaml, save_yaml


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Cfg:
    name: str = "run"
    steps: int = 10
    amp: bool = False
    mode: Literal["official", "paper"] = "official"
    taps: tuple[int, ...] = (0, 1)
    init: str | None = None
    optim: Optim = field(default_factory=Optim)


def test_overrides_are_typed_and_nested():
    cfg = apply_overrides(Cfg(), ["optim.lr=2e-4", "steps=5", "taps=[0, 1, 2]", "amp=true", "init=ckpt.pth"])
    assert cfg.optim.lr == 2e-4 and cfg.steps == 5 and cfg.taps == (0, 1, 2) and cfg.amp is True
    assert cfg.init == "ckpt.pth" and cfg.optim.betas == (0.9, 0.999)


@pytest.mark.parametrize(
    "override, match",
    [
        ("optim.lrr=1", "unknown configuration key optim.lrr"),
        ("nope.lr=1", "unknown configuration key nope"),
        ("steps=1.5", "steps: expected an integer"),
        ("amp=2", "amp: expected true or false"),
        ("mode=fast", "mode: 'fast' is not one of"),
        ("optim.betas=[0.9]", r"optim.betas: expected 2 values"),
        ("steps", "not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(Cfg(), [override])


def test_yaml_round_trip_and_errors(tmp_path):
    cfg = apply_overrides(Cfg(), ["optim.lr=5e-5", "mode=paper"])
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(Cfg, tmp_path / "c.yaml") == cfg
    (tmp_path / "bad.yaml").write_text("optim:\n  lr: 1e-3\n  momentum: 0.9\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown configuration key optim.momentum"):
        load_yaml(Cfg, tmp_path / "bad.yaml")
    (tmp_path / "partial.yaml").write_text("steps: 3\n")
    assert load_yaml(Cfg, tmp_path / "partial.yaml").optim.lr == 1e-3
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_yaml(Cfg, tmp_path / "missing.yaml")
