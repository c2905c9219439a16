"""VidPrism: a heterogeneous temporal Mixture-of-Experts head that transfers CLIP to video."""

from prism_vfm.video.backbone import FrameEncoder, FrameFeatureCache
from prism_vfm.video.config import HeadConfig
from prism_vfm.video.head import HeadOutput, VidPrismHead
from prism_vfm.video.losses import LossOutput, released_loss
from prism_vfm.video.model import VidPrism
from prism_vfm.video.official import load_official_head
from prism_vfm.video.text import TextEncoder, class_text_embeddings

__all__ = [
    "FrameEncoder",
    "FrameFeatureCache",
    "HeadConfig",
    "HeadOutput",
    "LossOutput",
    "TextEncoder",
    "VidPrism",
    "VidPrismHead",
    "class_text_embeddings",
    "load_official_head",
    "released_loss",
]
