"""How high boundary odsF can go on the demo's scenes, by image size: what the protocol, the released
training label and the released decoder head's output grid allow, with no network involved.

Not a timing. The ground truth is the demo's own val split (``render_scene``, seed 0, the PASCAL-Context
stream, scenes 320-351 at zoom 1.6, as ``prism demo`` writes them), scored by the demo's evaluation
(``evaluate_boundaries``: NMS, 99 thresholds, thinning, matching within 0.0075 x the image diagonal, the
default matcher). Three 8-bit "predictions" per image:

- ``boundaries``: the evaluation's own ground truth (``seg2bmap``, thinned) as the prediction — what the
  protocol lets a perfect prediction reach (the NMS clears a 5-pixel border);
- ``training label``: the released edge training label (non-zero 3x3 Laplacian, thinned;
  ``edge_from_label_map``) as the prediction — what a network that learned its label perfectly reaches.
  The label marks the pixels on both sides of a class change and thinning keeps one of them, while
  ``seg2bmap`` marks the pixel whose east / south neighbour differs; below a pixel of tolerance only
  exact hits count, so the two conventions disagree there;
- ``head grid``: the training label averaged over the output cells of the released decoder head
  (``DenseHead``: its last convolution runs at a quarter of the input size, here the 16 x 16 or 32 x 32
  grid), as logits, upsampled bilinearly to the input size as the head does. A bilinear upsampling has its
  maxima at the cell centres, so after NMS the edges can only sit on some pixel rows and columns of each
  cell: this estimates what the head's geometry allows a network that learned the label.

A head with ``output="subpixel"`` (``Stage2Config.subpixel_heads``) can draw any pixel map, so it is
bounded by its training label alone: the ``training label`` line for the released label, the
``boundaries`` line for ``edge_label="evaluation"`` (that label is the evaluation's own ground truth).

Sizes: 64 px (the demo: patch 4, a 16 x 16 token grid, 0.68 px of tolerance) and 128 px (patch 8, the same
token grid; the head at 32 x 32, 1.36 px of tolerance). Prints one line per size and prediction.
Run ``python benchmarks/demo_edge_ceiling.py --help`` for the options.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from prism_vfm.data.pascal_context import edge_from_label_map
from prism_vfm.data.scene_sets import STREAMS
from prism_vfm.data.scenes import SCENE_CLASSES, render_scene
from prism_vfm.metrics.boundary import boundary_ground_truth, dataset_max_dist_ratio, evaluate_boundaries
from prism_vfm.models.dense_head import HEAD_DOWN_RATIO

CONTEXT_IDS = np.array([c.context for c in SCENE_CLASSES])


def label_maps(size: int, first: int, count: int, zoom: float, seed: int = 0) -> list[np.ndarray]:
    """The PASCAL-Context ``LabelMap`` of scenes ``first`` … ``first + count - 1`` at ``size`` px."""
    stream = STREAMS["pascalcontext"]
    return [
        CONTEXT_IDS[render_scene(seed, i, (size, size), stream, zoom).labels]
        for i in range(first, first + count)
    ]


def head_grid(label: np.ndarray, down_ratio: int = HEAD_DOWN_RATIO) -> np.ndarray:
    """The training label averaged over the head's output cells, as logits, upsampled bilinearly to the
    input size (``align_corners=False``, as ``DenseHead``); 8-bit sigmoid as the evaluation reads it."""
    target = torch.from_numpy(label.astype(np.float32))[None, None]
    share = F.avg_pool2d(target, down_ratio).clamp(1e-3, 1 - 1e-3)
    logits = F.interpolate(torch.logit(share), size=label.shape, mode="bilinear", align_corners=False)
    return (torch.sigmoid(logits[0, 0]) * 255).to(torch.uint8).numpy()


def ceilings(maps: list[np.ndarray], workers: int) -> dict[str, float]:
    """odsF (in per cent, as ``boundary_scores`` gives it) of each prediction kind on ``maps``."""
    labels = [edge_from_label_map(m) for m in maps]
    predictions = {
        "boundaries": [boundary_ground_truth(m).astype(np.uint8) * 255 for m in maps],
        "training label": [y.astype(np.uint8) * 255 for y in labels],
        "head grid": [head_grid(y) for y in labels],
    }
    ratio = dataset_max_dist_ratio("pascalcontext")
    return {
        kind: float(evaluate_boundaries(edges, maps, ratio, workers=workers, progress=False)["odsF"])
        for kind, edges in predictions.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="image sizes (px)")
    parser.add_argument("--first", type=int, default=320, help="first scene (the demo's val split: 320)")
    parser.add_argument("--scenes", type=int, default=32, help="scenes (the demo's val split: 32)")
    parser.add_argument("--zoom", type=float, default=1.6, help="framing of the scenes (the demo's: 1.6)")
    parser.add_argument("--workers", type=int, default=0, help="evaluation processes (0: this one)")
    parser.add_argument("--quick", action="store_true", help="4 scenes at 64 px (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.scenes = [64], 4
    print(
        f"method: {args.scenes} scenes from {args.first} (zoom {args.zoom}); odsF by the demo's "
        f"evaluation, tolerance 0.0075 x the diagonal; head grid = input / {HEAD_DOWN_RATIO}"
    )
    for size in args.sizes:
        maps = label_maps(size, args.first, args.scenes, args.zoom)
        tolerance = 0.0075 * size * np.sqrt(2)
        for kind, value in ceilings(maps, args.workers).items():
            grid = f" ({size // HEAD_DOWN_RATIO}x{size // HEAD_DOWN_RATIO})" if kind == "head grid" else ""
            print(f"odsF ceiling {size} px (tolerance {tolerance:.2f} px) {kind}{grid}: {value:.1f}")


if __name__ == "__main__":
    main()
