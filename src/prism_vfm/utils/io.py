"""Atomic file writes (a crash mid-save never leaves a corrupt file under the final name), and safe reads."""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` written atomically."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_save_safetensors(
    tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict | None = None
) -> Path:
    """``safetensors.torch.save_file`` written atomically (tensors made contiguous)."""
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


class CheckpointReadError(ValueError):
    """A weight file that cannot be read (truncated, corrupt, or not a checkpoint)."""


class UnsafePickleError(CheckpointReadError):
    """A torch file that needs code to unpickle; ``weights_only=True`` refused it and ran nothing."""


def read_torch_file(path: str | os.PathLike, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with an error that names the file and the cause.

    A file whose pickle refers to code (functions or classes beyond tensors and plain containers) is
    refused by ``weights_only=True`` before anything runs: that is reported as an unsafe pickle, not as a
    damaged file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        try:
            code = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # an archive too damaged to list: fall through to the generic message
            code = []
        if code or "Weights only load failed" in str(exc):
            names = f" ({', '.join(code)})" if code else ""
            raise UnsafePickleError(
                f"{path} is an unsafe pickle: it refers to code{names}, which weights_only=True refused to "
                "run; nothing in it was executed. Load only weight files (tensors) from sources you trust"
            ) from None
        raise CheckpointReadError(f"{path} is not a readable PyTorch checkpoint ({exc})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointReadError(
            f"{path} is not a readable PyTorch checkpoint; it may be truncated (copy or download it "
            f"again) ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None


def read_safetensors_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """``safetensors.torch.load_file`` on the CPU, with an error that names the file and the cause."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) for bad files
        raise CheckpointReadError(
            f"{path} is not a readable safetensors file; it may be truncated (copy or download it again) "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None


def prepare_marked_output(out: Path, outputs: tuple[str, ...], marker: str, command: str) -> None:
    """Make ``out`` ready for a command that owns the names ``outputs`` in it, marked by file ``marker``.

    A previous run's outputs (the folder carries the marker) are removed; nothing else is touched.

    Raises:
        FileExistsError: ``out`` is a file, or holds one of ``outputs`` without the marker (someone
            else's; the message names the path).
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{command} output {out} is a file, not a folder")
    present = [out / name for name in outputs if (out / name).exists()]
    if present and not (out / marker).is_file():
        what = command.removeprefix("prism ")
        raise FileExistsError(
            f"{present[0]} exists but {out} holds no {what} marker ({marker}): `{command}` replaces only "
            "what it wrote; choose another --out or move it away"
        )
    for path in present:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / marker).write_text(f"written by `{command}`: its outputs here are replaced by its next run\n")
