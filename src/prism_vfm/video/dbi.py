"""DBI: dynamic bidirectional interaction between the fast and slow streams."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class DBIOutput:
    """The exchanged streams and the pair decisions."""

    streams: list[Tensor]  # per stream (B, L_i, D)
    pair_scores: Tensor  # (N, N, B); diagonal 0
    pair_passed: Tensor  # (N, N) bool
    last_writer: Tensor  # (N,) index of the surviving source per target, -1 = unchanged


class DBI(nn.Module):
    """Gated slow→fast and fast→slow exchange; ``update="last"`` (released) or ``"sum"``."""

    def __init__(
        self,
        dim: int,
        rates: tuple[int, ...],
        slow_rate: int = 8,
        threshold: float = 0.3,
        update: str = "last",
    ) -> None:
        super().__init__()
        raise NotImplementedError

    def forward(self, streams: list[Tensor]) -> DBIOutput:
        """Exchange information between ``streams`` (each (B, L_i, D))."""
        raise NotImplementedError
