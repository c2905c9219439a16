"""DBI: dynamic bidirectional interaction between the fast and slow streams.

Every ordered pair (i, j), i != j, has a score MLP on the streams' time-means,
``s_ij = sigmoid(MLP_ij([g_i; g_j]))`` per sample. A pair acts only when the **batch mean** of s_ij is at
least the threshold (one decision for the whole batch, as released). Slow → fast: the slow stream is
linearly interpolated to the fast length and passed through one 1×1 convolution shared by all such
pairs; fast → slow: the pair's own temporal convolution (kernel 5, stride r_j / r_i, no bias). Pairs of
the same speed are scored and do nothing.

Update semantics (``update``):

* ``"last"`` (released): every update reads the pre-DBI streams and replaces the target, the pairs
  visited with i outer and j inner, both ascending, so for each target only the last passing source
  counts. Only those surviving updates are computed here; the score MLPs and convolutions of the
  overwritten ones get no gradient, as in the release.
* ``"sum"``: every passing source's contribution is added to the pre-DBI target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

UPDATES = ("last", "sum")


@dataclass
class DBIOutput:
    """The exchanged streams and the pair decisions."""

    streams: list[Tensor]  # per stream (B, L_i, D)
    pair_scores: Tensor  # (N, N, B) s_ij, detached; diagonal 0 (never computed)
    pair_passed: Tensor  # (N, N) bool: i != j and batch mean of s_ij >= threshold
    last_writer: Tensor  # (N,) int64: last passing source of the other speed per target, -1 = none


def pair_key(i: int, j: int) -> str:
    """Name of the fast→slow convolution from stream i to stream j."""
    return f"{i}to{j}"


def interpolation_matrix(source: int, target: int, like: Tensor) -> Tensor:
    """(target, source) matrix of 1-D linear interpolation with align_corners=False."""
    eye = torch.eye(source, dtype=like.dtype, device=like.device).unsqueeze(0)
    return F.interpolate(eye, size=target, mode="linear", align_corners=False)[0].t()


class DBI(nn.Module):
    """Gated slow→fast and fast→slow exchange between the RgSTA streams."""

    def __init__(
        self,
        dim: int,
        rates: tuple[int, ...],
        slow_rate: int = 8,
        threshold: float = 0.3,
        update: str = "last",
    ) -> None:
        super().__init__()
        if update not in UPDATES:
            raise ValueError(f"DBI update={update!r}: expected one of {', '.join(UPDATES)}")
        self.rates = tuple(rates)
        self.slow = tuple(r >= slow_rate for r in self.rates)
        self.threshold, self.update = threshold, update
        n = len(self.rates)
        # All N² MLPs exist, the diagonal ones included (never called), as in the released state dict.
        self.score_mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * dim, dim // 4), nn.ReLU(), nn.Linear(dim // 4, 1), nn.Sigmoid())
            for _ in range(n * n)
        )
        self.slow_to_fast = nn.Conv1d(dim, dim, kernel_size=1)
        self.fast_to_slow = nn.ModuleDict()
        for i in range(n):
            for j in range(n):
                if not self.slow[i] and self.slow[j]:
                    if self.rates[j] % self.rates[i]:
                        raise ValueError(
                            f"DBI rates={self.rates}: {self.rates[j]} is not a multiple of {self.rates[i]}"
                        )
                    stride = self.rates[j] // self.rates[i]
                    self.fast_to_slow[pair_key(i, j)] = nn.Conv1d(
                        dim, dim, kernel_size=5, stride=stride, padding=2, bias=False
                    )

    def pairs(self) -> list[tuple[int, int]]:
        """The ordered pairs in the released visiting order (i outer, j inner, both ascending)."""
        n = len(self.rates)
        return [(i, j) for i in range(n) for j in range(n) if i != j]

    def project_slow(self, stream: Tensor) -> Tensor:
        """The shared slow→fast 1×1 convolution on a (B, L, D) stream."""
        return F.linear(stream, self.slow_to_fast.weight.squeeze(-1), self.slow_to_fast.bias)

    def contribution(self, streams: list[Tensor], i: int, j: int, projected: Tensor | None = None) -> Tensor:
        """What source i adds to target j before scaling, (B, L_j, D).

        Computed in the (B, L, D) layout as products: slow → fast as the interpolation matrix times the
        1×1 projection of the source (both linear in time and channels, so they commute; the
        interpolation weights of a row sum to 1, so the bias passes unchanged), which projects the short
        slow stream once instead of the long interpolated one (``projected`` may pass it in); fast → slow
        as one product of the kernel with the strided windows of the padded stream."""
        source = streams[i]
        length = streams[j].shape[1]
        if self.slow[i]:
            if projected is None:
                projected = self.project_slow(source)
            return interpolation_matrix(source.shape[1], length, source) @ projected
        conv = self.fast_to_slow[pair_key(i, j)]
        assert isinstance(conv, nn.Conv1d)
        pad = int(conv.padding[0])  # type: ignore[index]
        padded = F.pad(source, (0, 0, pad, pad))
        windows = padded.unfold(1, conv.kernel_size[0], conv.stride[0])  # (B, L_j, D, 5)
        return F.linear(windows.reshape(*windows.shape[:2], -1), conv.weight.reshape(conv.out_channels, -1))

    def forward(self, streams: list[Tensor]) -> DBIOutput:
        """Exchange information between ``streams`` (each (B, L_i, D))."""
        n = len(self.rates)
        if len(streams) != n:
            raise ValueError(f"DBI expects {n} streams, got {len(streams)}")
        summaries = [s.mean(dim=1) for s in streams]
        pairs = self.pairs()
        scores = {
            (i, j): self.score_mlps[i * n + j](torch.cat([summaries[i], summaries[j]], dim=-1)).squeeze(-1)
            for i, j in pairs
        }
        means = torch.stack([scores[p].mean() for p in pairs]).tolist()  # one host synchronisation
        passed = {p: not mean < self.threshold for p, mean in zip(pairs, means, strict=True)}

        outputs = list(streams)
        projected: dict[int, Tensor] = {}  # slow sources through the shared 1×1 projection
        last_writer = [-1] * n
        for j in range(n):
            sources = [i for i in range(n) if i != j and passed[(i, j)] and self.slow[i] != self.slow[j]]
            if not sources:
                continue
            last_writer[j] = sources[-1]
            writers = sources[-1:] if self.update == "last" else sources
            out = streams[j]
            for i in writers:
                if self.slow[i] and i not in projected:
                    projected[i] = self.project_slow(streams[i])
                contrib = self.contribution(streams, i, j, projected.get(i))
                out = out + scores[(i, j)].view(-1, 1, 1) * contrib
            outputs[j] = out

        batch = streams[0].shape[0]
        table = streams[0].new_zeros(n, n, batch)
        flags = torch.zeros(n, n, dtype=torch.bool)
        for (i, j), score in scores.items():
            table[i, j] = score.detach()
            flags[i, j] = passed[(i, j)]
        return DBIOutput(
            outputs, table, flags.to(streams[0].device), torch.tensor(last_writer, device=streams[0].device)
        )
