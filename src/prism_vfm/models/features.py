"""timm's ``features_only`` wrapper for the student, with the context the routers need."""

from __future__ import annotations

from typing import Any, cast

from timm.models._features import FeatureGetterNet
from torch import Tensor

from prism_vfm.models.outputs import ContextKind
from prism_vfm.models.prism_vit import Context, PrismViT


class PrismFeatures(FeatureGetterNet):
    """``timm.create_model(name, features_only=True)`` for a :class:`PrismViT`.

    ``features(x, context)`` returns the feature maps (B, D, h, w) of the blocks in ``out_indices`` (by
    default the model's feature taps), through :meth:`PrismViT.forward_intermediates`; the blocks after the
    last one are dropped, and so are the projector heads. A ``context`` (and ``kind``) given at creation,
    ``feature_cfg=dict(context=0)``, is used whenever a call gives none, so that ``features(x)`` works as
    any timm backbone does. ``feature_cfg=dict(norm=True)`` applies the final norm, as PRISM's taps have.
    """

    def __init__(
        self,
        model: PrismViT,
        out_indices: int | tuple[int, ...] = 4,
        out_map: Any = None,
        return_dict: bool = False,
        output_fmt: str = "NCHW",
        norm: bool = False,
        prune: bool = True,
        context: Context = None,
        kind: ContextKind = "teacher",
    ) -> None:
        super().__init__(
            model,
            out_indices=out_indices,
            out_map=out_map,
            return_dict=return_dict,
            output_fmt=output_fmt,
            norm=norm,
            prune=prune,
        )
        self.context = context
        self.kind: ContextKind = kind

    def forward(self, x: Tensor, context: Context = None, kind: ContextKind | None = None) -> list[Tensor]:
        """The feature maps of ``x`` under ``context`` (default: the one given at creation)."""
        model = cast(PrismViT, self.model)
        return cast(
            "list[Tensor]",
            model.forward_intermediates(
                x,
                indices=self.out_indices,
                norm=self.norm,
                output_fmt=self.output_fmt,
                intermediates_only=True,
                context=self.context if context is None else context,
                kind=self.kind if kind is None else kind,
            ),
        )
