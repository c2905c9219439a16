"""Released head state dicts (``fusion_model_state_dict``): key mapping and strict loading."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from prism_vfm.video.head import VidPrismHead


def load_official_head(state_dict: Mapping[str, Tensor]) -> VidPrismHead:
    """Build in eval mode the head a released state dict describes and load it strictly."""
    raise NotImplementedError
