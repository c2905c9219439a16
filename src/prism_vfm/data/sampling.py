"""Step-indexed sampling and per-sample seeded augmentation.

Together they make a training run's batches a function of (seed, step) alone: independent of the number
of processes (a 2-process run sees exactly what a 1-process run with 2 accumulation steps sees), of the
number of loader workers, and of interruptions (a resumed run starts at its step with nothing replayed).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (CRC-32 of their decimal string, twice, combined)."""
    text = ",".join(str(int(p)) for p in parts).encode()
    return (zlib.crc32(text) << 31) ^ zlib.crc32(text[::-1])


class ShardedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Micro-batches of ``(index, epoch)`` for one process, step after step.

    Each epoch is a seeded permutation of the data set cut into global batches of
    ``micro_batch · world_size · accum`` samples (the incomplete tail is dropped). Global batch ``s`` is cut
    into ``world_size · accum`` shards of ``micro_batch``; process ``rank`` takes shards
    ``m · world_size + rank`` for ``m < accum``, in order. Iteration runs from ``start_step`` to
    ``total_steps``.
    """

    def __init__(
        self,
        num_samples: int,
        micro_batch: int,
        total_steps: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        accum: int = 1,
        start_step: int = 0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.global_batch = micro_batch * world_size * accum
        if num_samples < self.global_batch:
            raise ValueError(
                f"the data set has {num_samples} images, fewer than one global batch of {self.global_batch} "
                f"(batch {micro_batch} × {world_size} processes × {accum} accumulation steps)"
            )
        self.num_samples = num_samples
        self.micro_batch = micro_batch
        self.total_steps = total_steps
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.accum = accum
        self.start_step = start_step
        self.steps_per_epoch = num_samples // self.global_batch

    def shard(self, micro: int) -> int:
        """Index of this process's ``micro``-th shard within a global batch."""
        return micro * self.world_size + self.rank

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, order = -1, torch.empty(0, dtype=torch.long)
        for step in range(self.start_step, self.total_steps):
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
                order = torch.randperm(self.num_samples, generator=g)
            start = (step % self.steps_per_epoch) * self.global_batch
            for m in range(self.accum):
                lo = start + self.shard(m) * self.micro_batch
                yield [(int(i), epoch) for i in order[lo : lo + self.micro_batch]]


class SeededAugmentation(Dataset):
    """Wraps a data set of raw samples; ``self[(index, epoch)]`` applies ``transform`` under a seed that
    depends only on (seed, epoch, index), whatever worker or process draws it."""

    def __init__(self, base: Dataset, transform: Callable[[Any], Any], seed: int) -> None:
        self.base = base
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        sample = self.base[index]
        # fork_rng keeps the caller's global RNG untouched when loading runs in the main process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, epoch, index))
            return self.transform(sample)
