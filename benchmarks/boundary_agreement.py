"""Agreement of the fast boundary matchers with the BSDS matcher (the reference) on realistic predictions.

Ground truth comes from the built-in scenes (``render_scene``) at PASCAL-Context's image sizes (375 x 500,
500 x 375, 500 x 500; label maps, tolerance 0.0075) and NYUD-v2's (425 x 560; boundary maps, tolerance
0.011), alternately. Each scene gives four 8-bit predictions, two of each kind with their own random
draws, scored through the whole protocol (NMS, binarisation, thinning, matching):

- ``soft``: the scene's boundaries moved by a smooth random displacement field (up to ~2 px), blurred,
  weakened along random stretches, plus the photo's texture edges and smooth noise, as a network's soft
  output looks;
- ``perturbed``: the ground truth itself perturbed — the label map displaced, a few regions merged away,
  spurious boundaries added from random regions — then blurred, with noise.

All matchers see the same NMS map, thresholds and thinning. The BSDS matcher (seed ``MATCHER_SEED``)
costs up to tens of seconds per threshold, so it runs at ``--thresholds`` (the same for every map), and
its counts can be taken from an earlier run's output instead (``--reference``); the fast matchers'
counts at those thresholds are compared pair by pair, and odsF / OIS / AP are computed from each on that
grid. The noise floor: the BSDS matcher run again with another seed of its random outlier graph
(``--noise-seed``), against itself — what any matcher can expect to reach against a randomly drawn
reference — and the ``fast`` matcher with that seed against it. ``--thresholds all`` takes all 99.
Prints the agreement and writes every count to ``--out`` (.npz).
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from scipy import ndimage

from prism_vfm.data.scenes import render_scene
from prism_vfm.metrics import boundary
from prism_vfm.metrics.boundary import (
    MATCHER_SEED,
    THRESHOLDS,
    boundary_ground_truth,
    boundary_scores,
    dataset_max_dist_ratio,
    edge_nms,
    image_counts,
    seg2bmap,
)

SIZES = {"pascal": [(375, 500), (500, 375), (500, 500)], "nyud": [(425, 560)]}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-12)


def _displace(array: np.ndarray, rng: np.random.Generator, amplitude: float, order: int) -> np.ndarray:
    rows, cols = np.mgrid[: array.shape[0], : array.shape[1]].astype(np.float64)
    dy = amplitude * _smooth_field(rng, array.shape, 12)
    dx = amplitude * _smooth_field(rng, array.shape, 12)
    return ndimage.map_coordinates(array, [rows + dy, cols + dx], order=order, mode="nearest")


def _to_uint8(soft: np.ndarray) -> np.ndarray:
    return (np.clip(soft, 0, 1) * 255).astype(np.uint8)


def soft_prediction(labels: np.ndarray, photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A network-like soft boundary map of a scene (``soft``)."""
    boundaries = _displace(seg2bmap(labels).astype(np.float64), rng, rng.uniform(0.3, 2.0), order=1)
    soft = ndimage.gaussian_filter(boundaries, rng.uniform(0.8, 2.0)) * rng.uniform(2.5, 5.0)
    soft *= np.clip(0.6 + 0.5 * _smooth_field(rng, labels.shape, 20), 0.05, 1.0)  # weak stretches
    grey = ndimage.gaussian_filter(photo.mean(axis=2), 1.0)
    texture = np.hypot(ndimage.sobel(grey, 0), ndimage.sobel(grey, 1))
    soft += rng.uniform(0.1, 0.5) * texture / (np.percentile(texture, 99) + 1e-6)
    soft += rng.uniform(0.05, 0.25) * np.clip(_smooth_field(rng, labels.shape, 2), 0, None)
    return _to_uint8(soft)


def perturbed_prediction(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The ground truth perturbed: displaced, regions merged, spurious boundaries (``perturbed``)."""
    moved = _displace(labels, rng, rng.uniform(0.5, 2.5), order=0)
    regions = np.unique(moved)
    for lost in rng.choice(regions, size=min(len(regions) - 1, int(rng.integers(0, 3))), replace=False):
        moved[moved == lost] = regions[0]
    centres = rng.integers(0, labels.shape, size=(int(rng.integers(3, 12)), 2))
    blobs = np.zeros(labels.shape, dtype=np.int64)
    blobs[tuple(centres.T)] = np.arange(1, len(centres) + 1)
    blobs = blobs[tuple(ndimage.distance_transform_edt(blobs == 0, return_indices=True)[1])]
    soft = ndimage.gaussian_filter(seg2bmap(moved).astype(np.float64), rng.uniform(0.7, 1.5)) * 3.5
    soft += rng.uniform(0.1, 0.6) * ndimage.gaussian_filter(seg2bmap(blobs).astype(np.float64), 1.0) * 3
    soft += rng.uniform(0.05, 0.2) * np.clip(_smooth_field(rng, labels.shape, 2), 0, None)
    return _to_uint8(soft)


MAPS_PER_SCENE = 4


def make_maps(scene_index: int, seed: int) -> list[tuple[int, str, str, np.ndarray, np.ndarray]]:
    """The maps of one scene: (map index, data set, kind, 8-bit prediction, ground truth)."""
    dataset = "pascal" if scene_index % 2 == 0 else "nyud"
    sizes = SIZES[dataset]
    scene = render_scene(seed, scene_index, sizes[(scene_index // 2) % len(sizes)])
    labels = scene.labels if dataset == "pascal" else scene.labels * 1000 + scene.instance
    ground_truth = labels if dataset == "pascal" else seg2bmap(labels)  # NYUD: a boundary map
    maps = []
    for index in range(scene_index * MAPS_PER_SCENE, (scene_index + 1) * MAPS_PER_SCENE):
        rng = np.random.default_rng([seed, index])
        if index % 2 == 0:
            kind, edge = "soft", soft_prediction(labels, scene.image.astype(np.float64), rng)
        else:
            kind, edge = "perturbed", perturbed_prediction(labels, rng)
        maps.append((index, dataset, kind, edge, ground_truth))
    return maps


def bsds_counts(
    edge: np.ndarray, ground_truth: np.ndarray, ratio: float, ks: np.ndarray, seed: int = MATCHER_SEED
) -> np.ndarray:
    """The reference counts at thresholds ``THRESHOLDS[ks]``, exactly as ``image_counts(..., "bsds")``,
    the matcher reseeded with ``seed`` before every match."""
    gt = boundary_ground_truth(ground_truth)
    levels = edge_nms(edge).astype(np.float64) / 255
    counts = np.zeros((4, len(ks)), dtype=np.int64)
    for j, k in enumerate(ks):
        pred = boundary.thin(levels >= THRESHOLDS[k])
        boundary._reseed_matcher(seed)
        matched_pred, matched_gt, _, _ = boundary.pyedgeeval().correspond_pixels(pred, gt, max_dist=ratio)
        counts[:, j] = (matched_gt > 0).sum(), gt.sum(), (matched_pred > 0).sum(), pred.sum()
    return counts


def evaluate_scene(
    scene_index: int, seed: int, ks: np.ndarray, reference: bool, noise_seed: int
) -> list[dict]:
    """Counts of every matcher on the maps of one scene (the BSDS ones at ``ks`` only; the seed-1
    reference only if ``reference``, the other seed only if ``noise_seed``)."""
    results = []
    for index, dataset, kind, edge, ground_truth in make_maps(scene_index, seed):
        ratio = dataset_max_dist_ratio(dataset)
        result: dict = {"index": index, "dataset": dataset, "kind": kind, "shape": edge.shape}
        for matcher in ("fast", "maximum"):
            start = time.process_time()
            result[matcher] = image_counts(edge, ground_truth, ratio, matcher)
            result[f"{matcher}_seconds"] = time.process_time() - start
        if noise_seed:
            levels, gt = edge_nms(edge), boundary_ground_truth(ground_truth)
            result["fast_noise"] = boundary._fast_counts(levels, gt, ratio, "fast", noise_seed)
        for key, wanted, bsds_seed in (
            ("bsds", reference, MATCHER_SEED),
            ("bsds_noise", noise_seed, noise_seed),
        ):
            if wanted:
                start = time.process_time()
                result[key] = bsds_counts(edge, ground_truth, ratio, ks, bsds_seed)
                result[f"{key}_seconds"] = time.process_time() - start
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=200, help="prediction maps, four per scene (default 200)")
    parser.add_argument("--seed", type=int, default=16, help="scene seed (default 16)")
    parser.add_argument(
        "--thresholds",
        default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
        help="comma-separated thresholds of the BSDS matcher, or 'all' (default 0.1, 0.2, ..., 0.9)",
    )
    parser.add_argument(
        "--reference", metavar="NPZ", help="take the BSDS counts (seed 1) from an earlier run's --out"
    )
    parser.add_argument(
        "--noise-seed", type=int, default=2, help="run the BSDS matcher again with this seed (0: do not)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all CPUs)")
    parser.add_argument("--out", default="boundary_agreement.npz", help="where every count is written")
    parser.add_argument("--summarise", metavar="NPZ", help="only print the report of the counts saved in NPZ")
    args = parser.parse_args(argv)
    if args.summarise:
        summarise(args.summarise)
        return
    if args.thresholds == "all":
        ks = np.arange(len(THRESHOLDS))
    else:
        wanted = [float(t) for t in args.thresholds.split(",")]
        ks = np.array([int(np.argmin(np.abs(THRESHOLDS - t))) for t in wanted])
    reference = None
    if args.reference:
        reference = np.load(args.reference)
        if not np.array_equal(reference["thresholds"], THRESHOLDS[ks]) or len(reference["bsds"]) < args.maps:
            raise SystemExit(f"{args.reference}: not the BSDS counts of {args.maps} maps at {THRESHOLDS[ks]}")
    print(
        f"{args.maps} maps (scene seed {args.seed}), BSDS matcher at {len(ks)} thresholds "
        f"{THRESHOLDS[ks].tolist()} (seed {MATCHER_SEED}: "
        f"{args.reference or 'computed'}; noise seed {args.noise_seed or 'none'}), fast matchers at all 99; "
        f"{args.workers} processes"
    )
    results: list[dict] = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        scenes = -(-args.maps // MAPS_PER_SCENE)
        jobs = [
            pool.submit(evaluate_scene, i, args.seed, ks, reference is None, args.noise_seed)
            for i in range(scenes)
        ]
        for r in (r for job in jobs for r in job.result()):
            if reference is not None:
                r["bsds"] = reference["bsds"][r["index"]]
                if not np.array_equal(r["bsds"][[1, 3]], r["fast"][[1, 3]][:, ks]):
                    raise SystemExit(f"{args.reference}: map {r['index']} has other totals than this run's")
            results.append(r)
            diff = np.abs(r["fast"][:, ks][[0, 2]] - r["bsds"][[0, 2]]).max()
            print(
                f"map {r['index']:3d} {r['dataset']:6s} {r['kind']:9s} {r['shape']}: "
                f"max |fast - bsds| {diff}, CPU s fast {r['fast_seconds']:.2f} maximum "
                f"{r['maximum_seconds']:.2f} (99 thr.)"
                + "".join(
                    f" {k} {r[k + '_seconds']:.2f}" for k in ("bsds", "bsds_noise") if k + "_seconds" in r
                )
                + f" ({len(ks)} thr.)",
                flush=True,
            )
            saved = {
                "thresholds": THRESHOLDS[ks],
                "threshold_index": ks,
                "noise_seed": args.noise_seed,
                "dataset": np.array([r["dataset"] for r in results]),
                "kind": np.array([r["kind"] for r in results]),
            }
            for key in ("fast", "maximum", "fast_noise"):
                if key in r:
                    saved[f"{key}_all"] = np.stack([r[key] for r in results])
                    saved[key] = saved[f"{key}_all"][:, :, ks]
            for key in ("bsds", "bsds_noise"):
                if key in r:
                    saved[key] = np.stack([r[key] for r in results])
            np.savez(args.out, **saved)
    summarise(args.out)
    for key in ("fast", "maximum", "bsds", "bsds_noise"):
        if f"{key}_seconds" in results[0]:
            median = np.median([r[f"{key}_seconds"] for r in results])
            grid = (
                "all 99 thresholds, NMS and thinning included" if key in ("fast", "maximum") else f"{len(ks)}"
            )
            print(f"median CPU seconds per map, {key}: {median:.2f} ({grid})")


def report(
    ours: np.ndarray, bsds: np.ndarray, datasets: np.ndarray, kinds: np.ndarray, grid: np.ndarray, name: str
) -> None:
    """Print the pairwise agreement of counts ``ours`` with the reference's and the scores of both, from
    counts ``(N, 4, T)`` at ``grid``."""
    print(f"\n=== {name} against the BSDS matcher (seed {MATCHER_SEED}) ===")
    fast = ours
    assert (fast[:, [1, 3]] == bsds[:, [1, 3]]).all(), "totals differ: the matchers saw different maps"
    diff = fast[:, [0, 2]] - bsds[:, [0, 2]]  # (N, 2, T)
    equal = (diff == 0).all(axis=1)
    share = np.abs(diff).max(axis=1) / np.maximum(bsds[:, 1], 1)
    print(
        f"{len(fast)} maps, (image, threshold) pairs: {equal.size}; matched counts equal on "
        f"{equal.sum()} ({100 * equal.mean():.2f} %)"
    )
    print(f"difference of matched counts: min {diff.min()}, max {diff.max()}, mean {diff[:, 0].mean():.3f}")
    print(
        f"largest difference: {np.abs(diff).max()} pixels; largest share of an image's ground-truth boundary "
        f"pixels: {100 * share.max():.3f} % (pairs above 0.1 %: {100 * (share > 0.001).mean():.2f} %)"
    )
    print(f"  equal per threshold (%): {np.round(100 * equal.mean(axis=0), 1).tolist()}")
    print(f"  mean difference per threshold: {np.round(diff[:, 0].mean(axis=0), 2).tolist()}")
    for kind in ("soft", "perturbed"):
        for dataset in ("pascal", "nyud"):
            rows = (kinds == kind) & (datasets == dataset)
            if rows.any():
                print(
                    f"  {dataset:6s} {kind:9s}: {rows.sum()} maps, equal on "
                    f"{100 * equal[rows].mean():.2f} %, largest share {100 * share[rows].max():.3f} %"
                )
    print(f"scores on the {len(grid)}-threshold grid {grid.tolist()}, {name} vs bsds:")
    for dataset in ("pascal", "nyud", None):
        rows = np.ones(len(fast), bool) if dataset is None else datasets == dataset
        if not rows.any():
            continue
        mine, ref = boundary_scores(fast[rows], grid), boundary_scores(bsds[rows], grid)
        line = ", ".join(
            f"{key} {mine[key]:.3f} vs {ref[key]:.3f} ({float(mine[key]) - float(ref[key]):+.3f})"
            for key in ("odsF", "oisF", "AP")
        )
        print(f"  {dataset or 'all':6s} ({rows.sum()} maps): {line}")


def summarise(path: str) -> None:
    """``report`` of every matcher's counts saved in ``path`` (e.g. of a run stopped early)."""
    saved = np.load(path)
    if "bsds" not in saved:
        raise SystemExit(f"{path}: no BSDS reference counts")
    common = (saved["bsds"], saved["dataset"], saved["kind"], saved["thresholds"])
    n = len(saved["bsds"])
    seed = int(saved["noise_seed"]) if "noise_seed" in saved else 0
    for key, name in (
        ("fast", "fast (BSDS assignment, seed 1)"),
        ("maximum", "maximum (maximum matching)"),
        ("bsds_noise", f"BSDS matcher, seed {seed} (noise floor)"),
        ("fast_noise", f"fast, seed {seed}"),
    ):
        if key in saved:
            report(saved[key][:n], *common, name)
    if "fast_all" in saved:
        # The fast matcher gives the BSDS matcher's counts, so it stands in for it at all 99 thresholds.
        print(f"\nscores on all {len(THRESHOLDS)} thresholds, against the fast matcher (seed {MATCHER_SEED})")
        for key, name in (("maximum_all", "maximum"), ("fast_noise_all", f"fast, seed {seed}")):
            if key not in saved:
                continue
            ours = saved[key]
            equal = (ours[:, [0, 2]] == saved["fast_all"][:, [0, 2]]).all(axis=1)
            mine, ref = boundary_scores(ours), boundary_scores(saved["fast_all"])
            line = ", ".join(
                f"{k} {mine[k]:.3f} vs {ref[k]:.3f} ({float(mine[k]) - float(ref[k]):+.3f})"
                for k in ("odsF", "oisF", "AP")
            )
            print(f"  {name} ({len(ours)} maps, counts equal on {100 * equal.mean():.2f} % of pairs): {line}")
    if "bsds_noise" in saved and "fast_noise" in saved:
        same = (saved["fast_noise"][: len(saved["bsds_noise"])] == saved["bsds_noise"]).all(axis=1)
        print(
            f"\nfast vs BSDS matcher, both seed {seed}: matched counts equal on {same.sum()} of {same.size} "
            f"pairs ({100 * same.mean():.2f} %)"
        )


if __name__ == "__main__":
    main()
