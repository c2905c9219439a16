"""On-disk tensor cache keyed by content: frozen frame features and class text embeddings.

Entries live under ``root/<namespace>/`` as one safetensors file each, named by the SHA-256 of the entry's
key and carrying the key itself in the file's metadata, so a file is never mistaken for another entry.
The namespace is derived from a fingerprint of the weights that computed the entries: new weights start
a new namespace, and nothing already in the cache is overwritten or deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from prism_vfm.utils.io import atomic_save_safetensors, atomic_write


def state_fingerprint(state: Mapping[str, Tensor], extra: Mapping[str, Any] | None = None) -> str:
    """SHA-256 over every entry (name, dtype, shape, raw bytes), in name order, plus ``extra`` as JSON."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    if extra:
        h.update(json.dumps(dict(extra), sort_keys=True, default=str).encode())
    return h.hexdigest()


def text_key(*parts: Any) -> str:
    """A stable string key for JSON-serialisable parts (class names, templates, ...)."""
    return json.dumps(list(parts), ensure_ascii=False, separators=(",", ":"))


class TensorCache:
    """``get`` / ``put`` of one tensor per string key under ``root/namespace``.

    ``describe`` is written once to ``root/namespace/cache.json`` so a person can tell what a namespace
    holds (the weights and settings that computed it).
    """

    def __init__(self, root: str | os.PathLike, namespace: str, describe: Mapping[str, Any] | None = None):
        self.dir = Path(root) / namespace
        self.describe = dict(describe or {})

    def path(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return self.dir / digest[:2] / f"{digest}.safetensors"

    def get(self, key: str) -> Tensor | None:
        """The stored tensor, or None when absent. A file holding another key is an error."""
        path = self.path(key)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get("key")
            if stored != key:
                raise ValueError(f"cache file {path} holds key {stored!r}, not {key!r}; the cache is corrupt")
            return f.get_tensor("value")

    def put(self, key: str, value: Tensor) -> Path:
        """Store ``value`` (as a CPU tensor) under ``key``, atomically."""
        if not (self.dir / "cache.json").is_file():
            text = json.dumps(self.describe, indent=1, sort_keys=True, default=str)
            atomic_write(self.dir / "cache.json", lambda tmp: _write_text(tmp, text))
        return atomic_save_safetensors({"value": value.detach().to("cpu")}, self.path(key), {"key": key})


def _write_text(path: str, text: str) -> None:
    Path(path).write_text(text, encoding="utf-8")
