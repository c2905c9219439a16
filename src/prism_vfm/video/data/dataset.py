"""The VidPrism video dataset: sampled frames of listed videos, augmented as released (SPEC §3.3–§3.5, §5).

Every random choice of a sample — its frames, its crop, flip and grayscale, the replacement for a broken
video — comes from a generator seeded by (seed, epoch, index, attempt) (:func:`sampling.sample_rng`), so
the data do not depend on the number of loader workers or processes, and a resumed run sees what an
uninterrupted one saw (call :meth:`VideoDataset.set_epoch` before each epoch, as with a
``DistributedSampler``).

Broken input is handled as released but deterministically, and never silently: a frame that does not
decode is replaced by the previous sampled frame (the next one for the first); a video that cannot be
opened, or none of whose sampled frames decode, is replaced by another sample drawn from the same
generator, up to ``max_retries`` times. Each sample carries the counts (``bad_videos``, ``bad_frames``)
and every event is logged with its path; :class:`DataIssues` sums them over batches for the trainer's log
and run summary.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from prism_vfm.data.registry import get_video_dataset
from prism_vfm.video.data import sampling
from prism_vfm.video.data.decode import VideoOpenError, open_video
from prism_vfm.video.data.lists import VideoSample
from prism_vfm.video.data.transforms import EvalViews, TrainAugment

log = logging.getLogger(__name__)

MODES = ("train", "val", "test")


class VideoDataset(Dataset):
    """Clips of ``num_frames`` frames from ``samples`` (paths relative to ``root``).

    ``mode``: ``train`` (TSN sampling and the released augmentation), ``val`` (first frame of each segment,
    one centre view) or ``test`` (``test_clips`` clips × ``test_crops`` crops, as separate views).
    ``dense`` switches to the released dense sampling. ``dataset`` (a registry name) supplies the flip label
    pairs and the grayscale switch of SSv2. ``decoder`` is ``pyav`` or ``decord`` for video files (frame
    folders are read with PIL), ``decode_threads`` its thread count. A sample is a dict: ``video`` float
    ``(T, 3, S, S)`` — in test mode ``(views, T, 3, S, S)``, crop-major —, ``label``, ``index`` (the sample
    actually read), and the ``bad_videos`` / ``bad_frames`` counts.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        samples: Sequence[VideoSample],
        mode: str = "train",
        num_frames: int = 32,
        size: int = 224,
        scale_size: int = 256,
        test_clips: int = 1,
        test_crops: int = 1,
        dense: bool = False,
        decoder: str = "pyav",
        decode_threads: int = 1,
        seed: int = 1024,
        dataset: str | None = None,
        max_retries: int = 10,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not samples:
            raise ValueError("a video dataset needs at least one sample")
        self.root = Path(root)
        self.samples = list(samples)
        self.mode = mode
        self.num_frames = num_frames
        self.test_clips = test_clips if mode == "test" else 1
        self.dense = dense
        self.decoder = decoder
        self.decode_threads = decode_threads
        self.seed = seed
        self.max_retries = max_retries
        self.epoch = 0
        info = get_video_dataset(dataset) if dataset is not None else None
        self.augment = TrainAugment(
            size,
            scale_size,
            grayscale_p=0.2 if info is None or info.grayscale else 0.0,
            flip_label_pairs=info.flip_label_pairs if info is not None else (),
        )
        self.views = EvalViews(size, test_crops if mode == "test" else 1)

    def set_epoch(self, epoch: int) -> None:
        """Draw the random choices of epoch ``epoch`` (the same for every worker and process)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def frame_indices(self, n_frames: int, rng: random.Random) -> list[int]:
        """The frames one draw reads from a video of ``n_frames`` frames, clip after clip."""
        t = self.num_frames
        if self.mode == "test":
            clips = (
                sampling.dense_test_indices(n_frames, t, self.test_clips)
                if self.dense
                else sampling.test_indices(n_frames, t, self.test_clips)
            )
            return [i for clip in clips for i in clip]
        if self.dense:
            return sampling.dense_train_indices(n_frames, t, np.random.RandomState(rng.getrandbits(32)))
        if self.mode == "train":
            return sampling.tsn_train_indices(n_frames, t, rng)
        return sampling.val_indices(n_frames, t)

    def _read(self, index: int, rng: random.Random) -> tuple[list[np.ndarray], int]:
        """Sampled frames of sample ``index`` with unreadable ones replaced; raises VideoOpenError."""
        path = self.root / self.samples[index].path
        video = open_video(path, self.decoder, self.decode_threads)
        try:
            indices = self.frame_indices(video.num_frames, rng)
            frames = video.frames(indices)
        finally:
            video.close()
        bad = [i for i, f in enumerate(frames) if f is None]
        if len(bad) == len(frames):
            raise VideoOpenError(f"{path}: none of the sampled frames decodes")
        for pos in bad:
            log.warning(
                "%s: frame %d does not decode; using a neighbouring sampled frame", path, indices[pos]
            )
        # Released fallback: the previous sampled frame, or the next one for the first.
        filled: list[np.ndarray | None] = list(frames)
        for pos in range(len(filled)):
            if filled[pos] is None and pos > 0:
                filled[pos] = filled[pos - 1]
        first = next(f for f in filled if f is not None)
        return [first if f is None else f for f in filled], len(bad)

    def __getitem__(self, index: int) -> dict[str, Any]:
        bad_videos = 0
        current = index
        for attempt in range(self.max_retries + 1):
            rng = sampling.sample_rng(self.seed, self.epoch, index, attempt)
            if attempt:
                current = rng.randrange(len(self.samples))
            try:
                frames, bad_frames = self._read(current, rng)
                break
            except VideoOpenError as e:
                bad_videos += 1
                log.warning("%s; replacing it by another sample", e)
        else:
            raise RuntimeError(
                f"sample {index} and {self.max_retries} replacements cannot be read; check the videos under "
                f"{self.root} (see the warnings above)"
            )
        clip = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)  # (K*T, 3, H, W) uint8
        label = self.samples[current].label
        if self.mode == "train":
            video, label = self.augment(clip, label, rng)
        else:
            video = self.views(clip.reshape(self.test_clips, self.num_frames, *clip.shape[1:]))
            if self.mode == "val":
                video = video[0]
        return {
            "video": video,
            "label": label,
            "index": current,
            "bad_videos": bad_videos,
            "bad_frames": bad_frames,
        }


class DataIssues:
    """Running totals of the broken input a loader met: videos replaced and frames replaced.

    A training step adds each batch (:meth:`update`); the loop logs :meth:`scalars`, keeps
    :meth:`as_dict` in its checkpoints' training state (restored with :meth:`load`, so a resumed run goes
    on counting) and writes :meth:`as_dict` to the run summary. Totals are per process: sum them over
    processes before reporting a distributed run.
    """

    def __init__(self) -> None:
        self.bad_videos = 0
        self.bad_frames = 0
        self.samples = 0

    def update(self, batch: Mapping[str, Any]) -> None:
        """Add the counts of one collated batch (or one sample)."""
        self.bad_videos += int(torch.as_tensor(batch["bad_videos"]).sum())
        self.bad_frames += int(torch.as_tensor(batch["bad_frames"]).sum())
        self.samples += int(torch.as_tensor(batch["label"]).numel())

    def as_dict(self) -> dict[str, int]:
        """The totals, for logs, checkpoints and the run summary."""
        return {"samples": self.samples, "bad_videos": self.bad_videos, "bad_frames": self.bad_frames}

    def load(self, totals: Mapping[str, int]) -> None:
        """Continue from totals saved by :meth:`as_dict` (a resumed run)."""
        self.samples, self.bad_videos, self.bad_frames = (
            int(totals["samples"]),
            int(totals["bad_videos"]),
            int(totals["bad_frames"]),
        )

    def scalars(self) -> dict[str, float]:
        """The totals as log scalars (``data/bad_videos``, ``data/bad_frames``)."""
        return {"data/bad_videos": float(self.bad_videos), "data/bad_frames": float(self.bad_frames)}

    def __str__(self) -> str:
        return (
            f"{self.samples} samples read; {self.bad_videos} videos could not be opened and were replaced; "
            f"{self.bad_frames} frames did not decode and were replaced by a neighbour"
        )
