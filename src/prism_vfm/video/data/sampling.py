"""Which frames of a video a clip uses (SPEC §3.4): TSN training, validation, multi-clip test and dense.

Every function returns 0-based frame numbers in ``[0, n_frames - 1]``: the released offsets carry an index
bias of 1 that its reader subtracts again before clamping, which is the identity on the result. Randomness
comes from the generator a caller passes, so a sample's frames depend only on how that generator was seeded
(:func:`sample_rng`: seed, epoch and sample index), never on the worker or the process that draws it.
"""

from __future__ import annotations

import math
import random
import zlib

import numpy as np

DENSE_RANGE = 128
"""Frames a dense clip spans (the released ``--dense`` path: interval ``128 // T``)."""


def sample_rng(seed: int, epoch: int, index: int, attempt: int = 0) -> random.Random:
    """The generator of one sample draw: a function of (seed, epoch, index, attempt) only."""
    return random.Random(zlib.crc32(f"{seed}/{epoch}/{index}/{attempt}".encode()))


def _check(n_frames: int, num_segments: int) -> None:
    if n_frames < 1:
        raise ValueError(f"a clip needs at least one decoded frame, got n_frames={n_frames}")
    if num_segments < 1:
        raise ValueError(f"num_segments must be at least 1, got {num_segments}")


def tsn_train_indices(n_frames: int, num_segments: int, rng: random.Random) -> list[int]:
    """TSN training frames: one uniform draw per segment from ``[round(i·s), round((i+1)·s)]``.

    ``s = (N − 1) / T``; both ends are inclusive and rounding is numpy's (halves to even), so adjacent
    segments share end points, as released. One ``rng.randint`` per segment in segment order, which is the
    released call sequence: ``random.Random(s)`` here gives the frames of ``random.seed(s)`` there.
    """
    _check(n_frames, num_segments)
    seg = float(n_frames - 1) / num_segments
    return [rng.randint(int(np.round(seg * i)), int(np.round(seg * (i + 1)))) for i in range(num_segments)]


def val_indices(n_frames: int, num_segments: int) -> list[int]:
    """Validation frames: ``⌊i·N/T⌋ mod N`` — the first frame of each segment, not its centre."""
    _check(n_frames, num_segments)
    tick = n_frames / float(num_segments)
    return [int(tick * i) % n_frames for i in range(num_segments)]


def test_clip_starts(n_frames: int, num_segments: int, num_clips: int) -> list[int]:
    """Start offsets of the test clips: ``linspace(0, N/T − 1, K)`` converted to int by flooring.

    Flooring is what numpy ≥ 2 does with ``dtype=int``; it differs from numpy < 2 (truncation) only when
    N < T, where the end point is negative.
    """
    _check(n_frames, num_segments)
    if num_clips < 1:
        raise ValueError(f"num_clips must be at least 1, got {num_clips}")
    tick = n_frames / float(num_segments)
    return [math.floor(v) for v in np.linspace(0, tick - 1, num=num_clips).tolist()]


def test_indices(n_frames: int, num_segments: int, num_clips: int) -> list[list[int]]:
    """Multi-clip test frames: per clip, ``⌊start + i·N/T⌋ mod N``; clip after clip."""
    tick = n_frames / float(num_segments)
    return [
        [int(start + tick * i) % n_frames for i in range(num_segments)]
        for start in test_clip_starts(n_frames, num_segments, num_clips)
    ]


def dense_train_indices(n_frames: int, num_segments: int, rng: np.random.RandomState) -> list[int]:
    """Dense frames (training and validation alike): a random start, then every ``128 // T``-th frame."""
    _check(n_frames, num_segments)
    sample_pos = max(1, 1 + n_frames - DENSE_RANGE)
    stride = DENSE_RANGE // num_segments
    start = 0 if sample_pos == 1 else int(rng.randint(0, sample_pos - 1))
    return [(i * stride + start) % n_frames for i in range(num_segments)]


def dense_test_indices(n_frames: int, num_segments: int, num_clips: int) -> list[list[int]]:
    """Dense test frames: ``num_clips`` starts evenly spaced in ``[0, max(0, N − 128)]``.

    The released formula divides by ``num_clips − 1``, so one clip is an error there; here it is the
    clip at start 0 (the only sensible reading), and the results for two or more clips are the released.
    """
    _check(n_frames, num_segments)
    sample_pos = max(0, n_frames - DENSE_RANGE)
    stride = DENSE_RANGE // num_segments
    step = math.floor(sample_pos / (num_clips - 1)) if num_clips > 1 else 0
    return [[(c * step + i * stride) % n_frames for i in range(num_segments)] for c in range(num_clips)]
