"""Run checkpoints: atomic, keep-last-k, and everything an exact resume needs.

A checkpoint is a folder ``<run>/checkpoints/step_XXXXXXXX/`` holding ``model.safetensors`` (the weights,
loadable with ``PrismViT.from_pretrained`` together with ``config.json``) and ``state.pt`` (optimizer,
scheduler, step, RNG states; read back with ``weights_only=True``). The folder is written under a
temporary name and renamed into place, so a crash mid-save never leaves a half-written checkpoint under a
final name; ``latest`` names the newest complete one. Temporary names start with a dot; a kill mid-save
leaves one behind, which :func:`remove_stale_temporaries` clears when the run starts again.

A run that validates may also keep its best checkpoint: ``best`` names the checkpoint of the step with the
best validation score so far, written the same way as ``latest`` (a pointer file replaced atomically), and
pruning never removes the checkpoint it names.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from prism_vfm.utils.io import atomic_write


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep_last: int = 3,
    config: dict[str, Any] | None = None,
    best: bool = False,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` (and, with ``best``, ``best``) at it, and prune.

    ``keep_last`` ≥ 1 keeps the newest ``keep_last`` checkpoints of steps up to ``step`` (this one
    included) and the one ``best`` names; 0 keeps every checkpoint. Checkpoints of later steps are never
    touched (they belong to no step this run has reached), so ``latest`` always names a checkpoint that
    exists.
    """
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {keep_last}")
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
        save_file(tensors, tmp / "model.safetensors")
        if config:
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
        torch.save(state, tmp / "state.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # a re-save of the same step (e.g. epoch end == periodic) replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    def write_pointer(p: str) -> None:
        Path(p).write_text(final.name + "\n")

    atomic_write(root / "latest", write_pointer)
    if best:
        atomic_write(root / "best", write_pointer)
    if keep_last > 0:
        kept = _pointed(root / "best")
        reached = sorted(s for s in checkpoint_steps(run_dir) if s <= step)
        for old in reached[:-keep_last]:
            if f"step_{old:08d}" != kept:
                shutil.rmtree(root / f"step_{old:08d}", ignore_errors=True)
    return final


def _pointed(pointer: Path) -> str | None:
    """The checkpoint name a pointer file (``latest``, ``best``) holds, or None without one."""
    return pointer.read_text().strip() if pointer.is_file() else None


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of a run's complete-named checkpoint folders, in increasing order."""
    steps = []
    for p in checkpoint_dir(run_dir).glob("step_*"):
        suffix = p.name.removeprefix("step_")
        if p.is_dir() and suffix.isdigit():
            steps.append(int(suffix))
    return sorted(steps)


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete what a kill during a save left behind (dot-named temporaries of checkpoints and ``latest``).

    Only names this module writes are touched: ``.step_XXXXXXXX.*`` folders and ``.latest.*.tmp`` /
    ``.best.*.tmp`` files.
    """
    root = checkpoint_dir(run_dir)
    patterns = (".step_*", ".latest.*.tmp", ".best.*.tmp")
    stale = [p for pattern in patterns for p in root.glob(pattern)] if root.is_dir() else []
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    return _pointed_checkpoint(checkpoint_dir(run_dir) / "latest")


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint of a run's best validation score so far, or None (a run that keeps no best)."""
    return _pointed_checkpoint(checkpoint_dir(run_dir) / "best")


def _pointed_checkpoint(pointer: Path) -> Path | None:
    name = _pointed(pointer)
    if name is None:
        return None
    path = pointer.parent / name
    if not (path / "model.safetensors").is_file() or not (path / "state.pt").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete or missing")
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The saved weights and training state of a checkpoint folder."""
    return load_file(path / "model.safetensors"), torch.load(
        path / "state.pt", map_location="cpu", weights_only=True
    )


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
