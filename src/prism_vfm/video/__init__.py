"""VidPrism: a heterogeneous temporal Mixture-of-Experts head that transfers CLIP to video."""

from prism_vfm.video.config import HeadConfig
from prism_vfm.video.head import HeadOutput, VidPrismHead
from prism_vfm.video.losses import LossOutput, released_loss
from prism_vfm.video.official import load_official_head

__all__ = ["HeadConfig", "HeadOutput", "LossOutput", "VidPrismHead", "load_official_head", "released_loss"]
