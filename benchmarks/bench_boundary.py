"""Cost of the boundary evaluation (odsF / oisF / AP, SPEC §9) per image, in one process and with workers.

Both cases score the same synthetic images with ``count_boundaries``: in this process (``workers=0``) and
in a pool of ``--workers`` processes. Each image is a Voronoi label map; its prediction is the thinned
ground-truth boundary moved by one pixel, blurred, plus smooth noise, so that NMS leaves weak spurious
edges at low thresholds as a network's output does. Matching dominates the cost and grows with the number
of edge pixels, so real predictions can cost more or less than these. Prints seconds per image (median of
the single-process case over the image count, wall and CPU time) and the speed-up (ratio of the wall-time
medians, which needs as many idle CPUs as workers to mean anything). Run
``python benchmarks/bench_boundary.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from scipy import ndimage

import harness
from prism_vfm.metrics.boundary import boundary_ground_truth, count_boundaries, dataset_max_dist_ratio


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--images", type=int, default=2, help="images per timed call (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="processes of the pool case (default 2)")
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

    def evaluate(workers: int) -> np.ndarray:
        return count_boundaries(edges, labels, ratio, workers=workers, progress=False)

    cpu_seconds: list[float] = []

    def evaluate_alone() -> None:
        start = time.process_time()
        evaluate(0)
        cpu_seconds.append(time.process_time() - start)

    cpu = torch.device("cpu")
    harness.describe(args, cpu)
    print(
        f"workload: {args.images} synthetic {args.size}x{args.size} images per call, {args.dataset} "
        f"tolerance {ratio} x diagonal, 99 thresholds; NMS, thinning and CSA matching per image"
    )
    single = "1 process (workers=0)"
    pooled = f"{args.workers} worker processes"
    cases = [harness.Case(single, evaluate_alone), harness.Case(pooled, lambda: evaluate(args.workers))]
    results = harness.run_interleaved(cases, args.repeats, args.warmup, cpu)
    harness.report("count_boundaries, whole call", results)
    per_image = results[single].median / args.images
    print(f"seconds per {args.size}x{args.size} image, single process: {per_image:.2f} wall")
    # CPU time is what a full split costs in total, and other load on the machine barely changes it.
    per_image_cpu = statistics.median(cpu_seconds) / args.images
    print(f"CPU seconds per {args.size}x{args.size} image, single process: {per_image_cpu:.2f}")
    harness.ratio(f"speed-up with {args.workers} workers", results[single], results[pooled])
    harness.finish()


if __name__ == "__main__":
    main()
