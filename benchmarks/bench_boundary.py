"""Cost of the boundary evaluation (odsF / oisF / AP, SPEC §9) per image: the fast matchers against the
BSDS matcher, side by side in one run, one process each.

Every case scores the same synthetic images with ``count_boundaries(..., workers=0)`` — the whole
protocol: NMS, 99 thresholds, thinning, matching — with ``matcher="fast"`` (the BSDS assignment computed
fast, the default), ``matcher="maximum"`` (maximum matching) and ``matcher="bsds"`` (SEISM's CSA matcher,
the reference). Each image is a Voronoi label map; its prediction is the thinned ground-truth boundary
moved by one pixel, blurred, plus smooth noise, so that NMS leaves weak spurious edges at low thresholds
as a network's output does. Matching dominates the reference's cost and grows with the number of edge
pixels, so real predictions can cost more or less than these. Prints seconds per image (median wall time
of a call over the image count, and CPU time), the speed-ups (ratios of the wall-time medians; target for
the default, ``fast``: >= 20), and the projected time of PASCAL-Context's test split (5,105 images) on 16
cores from the CPU seconds per image. One untimed call of the fast matcher comes first: it loads (or, the
first time, compiles) its Numba kernels. Run ``python benchmarks/bench_boundary.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from scipy import ndimage

import harness
from prism_vfm.metrics.boundary import (
    MATCHERS,
    boundary_ground_truth,
    count_boundaries,
    dataset_max_dist_ratio,
)


def synthetic_image(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An 8-bit edge prediction and its label map, ``size x size``."""
    rng = np.random.default_rng(seed)
    # 40 regions on 512 x 512, as many per pixel at other sizes: the edge density sets the matching cost.
    centres = rng.integers(0, size, size=(max(4, round(40 * size**2 / 512**2)), 2))
    rows, cols = np.mgrid[:size, :size]
    distances = (rows[..., None] - centres[:, 0]) ** 2 + (cols[..., None] - centres[:, 1]) ** 2
    labels = distances.argmin(axis=-1) % 7
    moved = np.roll(boundary_ground_truth(labels), 1, axis=1).astype(np.float64)
    noise = ndimage.gaussian_filter(rng.random(labels.shape), 2)
    soft = 4 * ndimage.gaussian_filter(moved, 1.5) + 0.15 * noise
    return (np.clip(soft, 0, 1) * 255).astype(np.uint8), labels


PASCAL_CONTEXT_TEST_IMAGES = 5105
PROJECTION_CORES = 16


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--images", type=int, default=1, help="images per timed call (default 1)")
    parser.add_argument("--dataset", default="pascal", choices=["pascal", "nyud"], help="matching tolerance")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds over both cases (default 2)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed calls per case first (default 0)")
    parser.add_argument("--quick", action="store_true", help="128 x 128 images: a smoke run, not a result")
    args = parser.parse_args(argv)
    if args.quick:
        args.size = 128
    args.dtype = "fp32"  # what harness.describe reports; the evaluation itself is NumPy float32 / float64

    images = [synthetic_image(args.size, seed) for seed in range(args.images)]
    edges, labels = [e for e, _ in images], [g for _, g in images]
    ratio = dataset_max_dist_ratio(args.dataset)
    cpu_seconds: dict[str, list[float]] = {matcher: [] for matcher in MATCHERS}

    def evaluate(matcher: str) -> None:
        start = time.process_time()
        count_boundaries(edges, labels, ratio, workers=0, progress=False, matcher=matcher)
        cpu_seconds[matcher].append(time.process_time() - start)

    # The fast matcher's Numba kernels compile once per installation (cached on disk after that): not timed.
    start = time.perf_counter()
    count_boundaries(edges[:1], labels[:1], ratio, workers=0, progress=False, matcher="fast")
    compile_seconds = time.perf_counter() - start

    cpu = torch.device("cpu")
    harness.describe(args, cpu)
    print(f"untimed first call of the fast matcher (loads or compiles its kernels): {compile_seconds:.1f} s")
    print(
        f"workload: {args.images} synthetic {args.size}x{args.size} images per call, {args.dataset} "
        f"tolerance {ratio} x diagonal, 99 thresholds; NMS, thinning and matching per image, one process"
    )
    names = {
        "fast": "fast matcher (BSDS assignment)",
        "maximum": "maximum matching",
        "bsds": "BSDS matcher (reference)",
    }
    cases = [harness.Case(names[m], lambda m=m: evaluate(m)) for m in MATCHERS]
    results = harness.run_interleaved(cases, args.repeats, args.warmup, cpu)
    harness.report("count_boundaries, whole call, workers=0", results)
    for matcher in MATCHERS:
        wall = results[names[matcher]].median / args.images
        cpu_time = statistics.median(cpu_seconds[matcher]) / args.images
        # CPU time is what a full split costs in total, and other load on the machine barely changes it.
        hours = cpu_time * PASCAL_CONTEXT_TEST_IMAGES / PROJECTION_CORES / 3600
        print(
            f"{names[matcher]}: {wall:.2f} s wall, {cpu_time:.2f} CPU s per {args.size}x{args.size} image; "
            f"PASCAL-Context test ({PASCAL_CONTEXT_TEST_IMAGES} images) on {PROJECTION_CORES} cores: "
            f"{hours * 60:.1f} min"
        )
    fast, maximum, bsds = (results[names[m]] for m in ("fast", "maximum", "bsds"))
    harness.ratio("speed-up of the fast matcher", bsds, fast, target=20, at_least=True)
    harness.ratio("speed-up of maximum matching", bsds, maximum)
    harness.finish()


if __name__ == "__main__":
    main()
