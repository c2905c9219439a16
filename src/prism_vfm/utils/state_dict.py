"""Comparing a state dict with the one a model expects."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

_SHOWN = 8  # keys listed per kind in a mismatch error


def check_keys(own: Mapping[str, Tensor], given: Mapping[str, Tensor], what: str) -> None:
    """Raise ValueError listing missing, unexpected and wrong-shape keys of ``given`` against ``own``.

    ``what`` opens the message and names the source (e.g. ``"CLIP vision weights from clip.pt"``).
    """
    missing = sorted(own.keys() - given.keys())
    unexpected = sorted(given.keys() - own.keys())
    resized = sorted(
        f"{k} (file {tuple(given[k].shape)}, model {tuple(own[k].shape)})"
        for k in own.keys() & given.keys()
        if given[k].shape != own[k].shape
    )
    problems = [
        f"{len(keys)} {kind}: {', '.join(keys[:_SHOWN])}{', ...' if len(keys) > _SHOWN else ''}"
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", resized))
        if keys
    ]
    if problems:
        raise ValueError(f"{what} does not match the model; " + "; ".join(problems))
