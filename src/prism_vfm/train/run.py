"""A run folder: what it holds, when a run may write into it, and what resuming it may change.

A run folder holds one run and nothing else: ``config.yaml`` (the settings it was started with),
``config_changes.yaml`` (settings changed on a resume, with the step), ``metrics.jsonl``, ``tensorboard/``,
``checkpoints/`` and, once it ends, ``summary.json``. A new run needs an empty (or absent) folder;
``overwrite`` first removes exactly those run files, and refuses if the folder holds anything else.
``resume`` continues from the folder's ``latest`` checkpoint after comparing the saved settings with the
new ones: a difference in a setting that changes the result stops the run with the list of differences,
unless ``allow_config_change``.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from prism_vfm.config import ConfigError, save_yaml, to_dict
from prism_vfm.train.checkpoint import latest_checkpoint, load_checkpoint, remove_stale_temporaries
from prism_vfm.train.distributed import DistEnv, barrier, init_distributed
from prism_vfm.train.precision import choose_precision

logger = logging.getLogger(__name__)

RUN_FILES = (
    "config.yaml",
    "config_changes.yaml",
    "metrics.jsonl",
    "tensorboard",
    "checkpoints",
    "summary.json",
)
"""Everything a training run writes into its folder (and all that ``overwrite`` removes)."""

RUN_CONTROL = frozenset(
    {"out", "max_steps", "workers", "log_every", "ckpt_every", "keep_last", "val_every"}
    | {"fsdp", "best_metric"}  # how the processes share the model (same result); which checkpoint is kept
)
"""Settings a resume may change freely (still recorded): where and how long a run goes, not what it learns."""


class ConfigChangedError(ConfigError):
    """A resumed run's settings differ from the ones its folder was started with."""


def flat_config(config: Any) -> dict[str, Any]:
    """A config dataclass or a nested mapping as ``{dotted.key: plain value}``."""
    data = to_dict(config) if not isinstance(config, Mapping) else config
    out: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping) and value:
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value

    walk(data, "")
    return out


def config_differences(old: Any, new: Any) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` for every setting that differs (a key absent on one side reads as ``None``).

    A setting ``old`` lacks (one added since that run was started) is no difference while ``new`` keeps
    its default (``new`` a config dataclass): that default is what the older version did."""
    a, b = flat_config(old), flat_config(new)
    defaults = _defaults(new)
    return {
        k: (a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not (k not in a and k in defaults and b[k] == defaults[k])
    }


def _defaults(config: Any) -> dict[str, Any]:
    """The flat defaults of a config dataclass instance (``{}`` for anything else)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return {}
    try:
        return flat_config(type(config)())
    except TypeError:  # a dataclass with required fields has no defaults to fall back on
        return {}


def _describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {old!r} → {new!r}" for k, (old, new) in changes.items())


class TrainingRun:
    """A run folder opened for training: checked, prepared, and holding the checkpoint to resume from.

    Every check happens here, before any data or model is built; on several processes every rank checks
    and only the main one writes. After construction, ``start_step`` is where training begins and
    ``resume_state`` is the saved training state (``None`` for a new run).
    """

    def __init__(
        self,
        out: str | Path,
        config: Any,
        *,
        resume: bool = False,
        overwrite: bool = False,
        allow_config_change: bool = False,
        is_main: bool = True,
    ) -> None:
        self.path = Path(out)
        self.is_main = is_main
        self.start_step = 0
        self.resume_state: dict[str, Any] | None = None
        self._weights: dict[str, torch.Tensor] | None = None
        self.changes: dict[str, tuple[Any, Any]] = {}
        if resume and overwrite:
            raise ConfigError("--resume continues a run and --overwrite replaces it: give one of them")
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"run folder {self.path} is a file, not a folder")
        self.checkpoint: Path | None = None
        if resume:
            self.checkpoint = self._check_resume(config, allow_config_change)
        else:
            self._check_new(overwrite)
        barrier()  # every rank has checked before the main one writes
        if is_main:
            self._prepare(config, resume)
        barrier()
        if self.checkpoint is not None:
            self._weights, self.resume_state = load_checkpoint(self.checkpoint)
            self.start_step = int(self.resume_state["step"])
            if is_main:
                logger.info("resuming %s at step %d", self.checkpoint, self.start_step)

    def _check_new(self, overwrite: bool) -> None:
        entries = sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
        if not entries:
            return
        if not overwrite:
            raise FileExistsError(
                f"run folder {self.path} is not empty (holds {', '.join(entries[:4])}"
                f"{', …' if len(entries) > 4 else ''}): --resume continues the run in it, --overwrite "
                "replaces it, or choose another output folder"
            )
        foreign = [e for e in entries if e not in RUN_FILES]
        if foreign:
            raise FileExistsError(
                f"--overwrite removes only a run's own files ({', '.join(RUN_FILES)}), but {self.path} also "
                f"holds {', '.join(foreign[:4])}: move them away or choose another output folder"
            )

    def _check_resume(self, config: Any, allow_config_change: bool) -> Path:
        checkpoint = latest_checkpoint(self.path)
        if checkpoint is None:
            raise FileNotFoundError(
                f"--resume: {self.path} has no checkpoint (looked for {self.path}/checkpoints/latest; a run "
                "stopped before its first checkpoint starts again with --overwrite)"
            )
        saved = self.path / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {saved} is missing, so the run's settings are unknown")
        self.changes = config_differences(yaml.safe_load(saved.read_text()) or {}, config)
        result_changes = {k: v for k, v in self.changes.items() if k not in RUN_CONTROL}
        if result_changes and not allow_config_change:
            raise ConfigChangedError(
                f"--resume: the settings differ from {saved}: {_describe(result_changes)} (restore them, or "
                "pass --allow-config-change to continue with the new ones; the change is then recorded in "
                "config_changes.yaml)"
            )
        return checkpoint

    def _prepare(self, config: Any, resume: bool) -> None:
        if not resume:
            for name in RUN_FILES:  # only reached with overwrite, or in an empty folder
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
            self.path.mkdir(parents=True, exist_ok=True)
            save_yaml(config, self.path / "config.yaml")
        for stale in remove_stale_temporaries(self.path):
            logger.warning("removed %s, left by a run killed while saving", stale)
        if resume and self.changes:
            assert self.checkpoint is not None
            step = int(self.checkpoint.name.removeprefix("step_"))
            record = {
                "resumed_at_step": step,
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "changes": {k: {"old": old, "new": new} for k, (old, new) in self.changes.items()},
            }
            with open(self.path / "config_changes.yaml", "a") as f:
                f.write(yaml.safe_dump([record], sort_keys=False, allow_unicode=True))
            logger.warning("resuming with changed settings: %s", _describe(self.changes))

    def restore_weights(self, model: nn.Module) -> None:
        """Load the resumed checkpoint's weights into ``model`` (strict); nothing for a new run.

        Call it before the model is wrapped for several processes.
        """
        if self._weights is not None:
            model.load_state_dict(self._weights, strict=True)
            self._weights = None


def start_run(
    config: Any,
    *,
    resume: bool = False,
    overwrite: bool = False,
    allow_config_change: bool = False,
    sharded: bool = False,
) -> tuple[DistEnv, TrainingRun]:
    """The opening of every trainer: join the process group, stop on a precision the device cannot run
    (``config.amp``; ``sharded``: FSDP over several processes), and open the run folder ``config.out``."""
    env = init_distributed()
    choose_precision(config.amp, env.device, sharded and env.world_size > 1)
    run = TrainingRun(
        config.out,
        config,
        resume=resume,
        overwrite=overwrite,
        allow_config_change=allow_config_change,
        is_main=env.is_main,
    )
    return env, run
