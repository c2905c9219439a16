"""Locality-aware feature decorrelation on a student projection map (SPEC §5, §12).

Both forms compare every pair of grid positions of one image: the grid vectors are L2-normalised over
channels, their pairwise cosines come from one batched matmul, and a constant (h*w, h*w) mask decides how
much each pair counts according to the pairs' distance on the grid (in patch units). The result is a mean
over the batch and over all (h*w)^2 ordered pairs, the diagonal included.

* ``"official"`` (released code, our default): ``mean |cos(z_i, z_j)| * (1 - exp(-d_ij^2 / (2 sigma^2)))``
  with ``sigma = sigma_fraction * min(h, w)``; nearby positions may stay similar, distant ones may not.
* ``"paper"``: ``mean max(0, cos(z_i, z_j) - margin) * 1[d_ij > radius]``. The paper gives no values for
  the margin and the radius; ours (0.1 and 2 patches) are our own choice.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DecorrelationForm = Literal["official", "paper"]


def _grid_squared_distances(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    rows, cols = torch.meshgrid(
        torch.arange(h, device=device, dtype=dtype),
        torch.arange(w, device=device, dtype=dtype),
        indexing="ij",
    )
    coords = torch.stack((rows.flatten(), cols.flatten()), dim=1)
    return (coords[:, None, :] - coords[None, :, :]).pow(2).sum(dim=-1)


# The masks are cached across calls; inference_mode(False) keeps a mask first built during evaluation
# from becoming an inference tensor, which autograd would refuse to save in a later training step.
@functools.lru_cache(maxsize=32)
def gaussian_locality_mask(
    h: int, w: int, sigma_fraction: float, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``1 - exp(-d^2 / (2 sigma^2))`` for every pair of positions of an ``h x w`` grid, ``(h*w, h*w)``.

    ``sigma = sigma_fraction * min(h, w)``. Cached per argument tuple; the returned tensor is shared and
    must not be modified in place.
    """
    with torch.inference_mode(False):
        sigma = sigma_fraction * min(h, w)
        sq_dist = _grid_squared_distances(h, w, device, dtype)
        return 1.0 - torch.exp(-sq_dist / (2.0 * sigma**2))


@functools.lru_cache(maxsize=32)
def distance_indicator_mask(
    h: int, w: int, radius: float, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``1[d > radius]`` for every pair of positions of an ``h x w`` grid, ``(h*w, h*w)``, as ``dtype``.

    Cached per argument tuple; the returned tensor is shared and must not be modified in place.
    """
    with torch.inference_mode(False):
        sq_dist = _grid_squared_distances(h, w, device, dtype)
        return (sq_dist > radius**2).to(dtype)


def _pairwise_cosine(features: Tensor) -> Tensor:
    """``(B, C, h, w)`` -> ``(B, h*w, h*w)`` cosine similarity of every pair of grid vectors."""
    if features.dim() != 4:
        raise ValueError(f"expected a (B, C, h, w) feature map, got shape {tuple(features.shape)}")
    z = F.normalize(features.flatten(2), dim=1)
    return torch.bmm(z.transpose(1, 2), z)


def locality_decorrelation_loss(features: Tensor, sigma_fraction: float = 0.1) -> Tensor:
    """Official decorrelation of one ``(B, C, h, w)`` map: mean over pairs of ``|cos| * (1 - Gaussian(d))``.

    ``Gaussian(d) = exp(-d^2 / (2 sigma^2))`` with ``sigma = sigma_fraction * min(h, w)``.
    """
    cos = _pairwise_cosine(features)
    h, w = features.shape[-2:]
    mask = gaussian_locality_mask(h, w, sigma_fraction, features.device, features.dtype)
    return (cos.abs() * mask).mean()


def thresholded_decorrelation_loss(features: Tensor, margin: float = 0.1, radius: float = 2.0) -> Tensor:
    """Paper decorrelation of one ``(B, C, h, w)`` map: mean of ``max(0, cos - margin) * 1[d > radius]``.

    The mean runs over all ``(h*w)^2`` pairs, as in the official form, so that the two forms are on the
    same scale.
    """
    cos = _pairwise_cosine(features)
    h, w = features.shape[-2:]
    mask = distance_indicator_mask(h, w, radius, features.device, features.dtype)
    return ((cos - margin).clamp_min(0.0) * mask).mean()


class DecorrelationLoss(nn.Module):
    """Decorrelation term of one student projection map, in the official or the paper form.

    Args:
        form: ``"official"`` (|cos| times a Gaussian locality penalty) or ``"paper"`` (hinged cos of pairs
            farther apart than ``radius``).
        sigma_fraction: official form, Gaussian width as a fraction of ``min(h, w)``.
        margin: paper form, cosine similarity tolerated without penalty.
        radius: paper form, pairs at grid distance ``<= radius`` (patch units) are not penalised.
    """

    def __init__(
        self,
        form: DecorrelationForm = "official",
        sigma_fraction: float = 0.1,
        margin: float = 0.1,
        radius: float = 2.0,
    ) -> None:
        super().__init__()
        if form not in ("official", "paper"):
            raise ValueError(f"unknown decorrelation form {form!r}; expected 'official' or 'paper'")
        self.form = form
        self.sigma_fraction = sigma_fraction
        self.margin = margin
        self.radius = radius

    def forward(self, features: Tensor) -> Tensor:
        """Scalar loss of a ``(B, C, h, w)`` map."""
        if self.form == "official":
            return locality_decorrelation_loss(features, self.sigma_fraction)
        return thresholded_decorrelation_loss(features, self.margin, self.radius)

    def extra_repr(self) -> str:
        if self.form == "official":
            return f"form='official', sigma_fraction={self.sigma_fraction}"
        return f"form='paper', margin={self.margin}, radius={self.radius}"
