"""A tiny on-disk image folder for tests and examples, including the awkward files real datasets contain."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class TinyImageFolder:
    """What ``write_tiny_image_folder`` wrote: the decodable files, the broken ones, the odd ones by kind."""

    root: Path
    good: list[Path]
    bad: list[Path]
    odd: dict[str, Path] = field(default_factory=dict)


def _texture(rng: np.random.Generator, height: int, width: int, channels: int | None = None) -> np.ndarray:
    """Smooth random colour blobs: bilinear up-sampled coarse noise, so JPEG compresses it like a photo."""
    shape = (max(height // 8, 2), max(width // 8, 2)) + ((channels,) if channels else ())
    coarse = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    return np.asarray(coarse.resize((width, height), Image.Resampling.BILINEAR))


def write_tiny_image_folder(
    root: str | os.PathLike[str],
    n_classes: int = 2,
    per_class: int = 4,
    size: tuple[int, int] = (40, 48),
    seed: int = 0,
    odd_formats: bool = True,
) -> TinyImageFolder:
    """Write an ImageNet-layout folder ``root/class_XX/img_YYY.JPEG`` of random RGB textures.

    ``size`` is ``(height, width)``. With ``odd_formats`` a further class folder ``root/odd/`` holds a
    grayscale PNG, an RGBA PNG, a pure-cyan CMYK JPEG, a 16-bit grayscale PNG whose columns ramp from 0 to
    65535, a JPEG cut in half and a text file named ``.png``; the last two are the ``bad`` files.
    """
    root = Path(root)
    height, width = size
    rng = np.random.default_rng(seed)
    good: list[Path] = []
    for c in range(n_classes):
        class_dir = root / f"class_{c:02d}"
        class_dir.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = class_dir / f"img_{i:03d}.JPEG"
            Image.fromarray(_texture(rng, height, width, 3)).save(path, quality=90)
            good.append(path)
    if not odd_formats:
        return TinyImageFolder(root, sorted(good), [])

    odd_dir = root / "odd"
    odd_dir.mkdir(parents=True, exist_ok=True)
    odd = {
        kind: odd_dir / name
        for kind, name in [
            ("gray", "gray.png"),
            ("rgba", "rgba.png"),
            ("cmyk", "cmyk_cyan.jpg"),
            ("gray16", "gray16.png"),
            ("truncated", "truncated.jpg"),
            ("not_an_image", "not_an_image.png"),
        ]
    }
    Image.fromarray(_texture(rng, height, width)).save(odd["gray"])
    rgba = np.dstack([_texture(rng, height, width, 3), _texture(rng, height, width)])
    Image.fromarray(rgba).save(odd["rgba"])
    Image.new("CMYK", (width, height), (255, 0, 0, 0)).save(odd["cmyk"], quality=95)
    ramp = np.linspace(0, 65535, width).round().astype(np.uint16)
    Image.fromarray(np.ascontiguousarray(np.broadcast_to(ramp, (height, width)))).save(odd["gray16"])
    encoded = io.BytesIO()
    Image.fromarray(_texture(rng, height, width, 3)).save(encoded, format="JPEG", quality=90)
    odd["truncated"].write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    odd["not_an_image"].write_text("this is not an image\n")

    bad = [odd["truncated"], odd["not_an_image"]]
    good += [odd[kind] for kind in ("gray", "rgba", "cmyk", "gray16")]
    return TinyImageFolder(root, sorted(good), sorted(bad), odd)
