"""The PRISM student: a timm ViT with dual-stream conditioned-MoE blocks (SPEC §2–§5)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import replace
from typing import Any, cast

import torch
from timm.layers import Mlp, resample_abs_pos_embed, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from prism_vfm.layers.dual_stream import BlockRouting, DualStreamBlock
from prism_vfm.layers.moe import MoEConfig
from prism_vfm.layers.net2net import net2net_widen
from prism_vfm.models.hub import HubMixin
from prism_vfm.models.outputs import ContextKind, PrismOutput

# Context ids: one per sample ((B,) integer tensor or sequence), one int for the whole batch, or None for a
# model whose output does not depend on them.
Context = Tensor | int | Sequence[int] | None


class ProjectorHead(nn.Sequential):
    """Linear(D→D) → GELU → Linear(D→C): maps a student tap to one teacher's feature space (SPEC §5)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, out_dim))
        for layer in (cast(nn.Linear, self[0]), cast(nn.Linear, self[2])):
            trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)


class PrismViT(
    VisionTransformer,
    HubMixin,
    library_name="prism-vfm",
    tags=["prism", "vision-transformer", "mixture-of-experts", "distillation"],
    license="mit",
):
    """ViT student with dual-stream blocks, context tables and per-(teacher, tap) projector heads.

    ``model(x, context)`` returns a :class:`PrismOutput`: the feature taps (each block output at
    ``tap_layers`` passed through the final norm), the load-balancing loss and, when asked
    (``return_routing=True``), every dual-stream block's routing and λ. ``context`` holds one id per sample
    (or one for the batch) into the teacher table (``kind="teacher"``, Stage 1) or the task table
    (``kind="task"``, Stage 2). timm's interface takes the context the same way: ``forward_features``,
    ``forward_intermediates``, ``features_only=True`` and ``set_grad_checkpointing``. All constructor
    arguments are plain values so the model round-trips through ``save_pretrained`` / ``from_pretrained``
    (``config.json`` + ``model.safetensors``).

    Ablation switches (defaults: PRISM as released; see :mod:`prism_vfm.ablation` for the named variants):
    ``anchor=False`` drops the anchor MLP and the λ gate (λ ≡ 0); ``conditioning`` is ``"film"``,
    ``"concat"`` (context concatenated to the router input) or ``"none"`` (context-free router);
    ``shared_expert``, ``num_experts``, ``top_k``, ``expert_mlp_ratio`` size the MoE; ``moe_layers=()``
    gives a dense student (``tap_layers`` then required); ``wide_layers`` are dense blocks whose MLP has
    ``wide_hidden`` hidden units, Net2Net-tiled from the block's own (or a loaded pretrained) MLP.

    Initialisation (defaults: as released): ``expert_init="copy"`` starts every routed and shared expert as
    the block's MLP, ``"random"`` initialises them independently (a student trained from random weights);
    ``context_init_std`` is the std of the teacher and task tables' trunc-normal initialisation (cut at ±2).
    """

    #: Range-check context ids that arrive already on an accelerator. Off by default: it reads them back,
    #: which makes every forward wait for the device. Ids given on the host are always checked there.
    check_device_ids: bool = False

    def __init__(
        self,
        img_size: int | Sequence[int] = 384,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        moe_layers: Sequence[int] = (2, 5, 8, 11),
        tap_layers: Sequence[int] | None = None,
        teacher_dims: Sequence[int] = (1024, 1024, 1024),
        num_tasks: int = 0,
        projectors: bool = True,
        num_experts: int = 15,
        top_k: int = 3,
        expert_mlp_ratio: float | None = None,
        shared_expert: bool = True,
        expert_dropout: float = 0.1,
        noisy_gating: bool = True,
        double_weighting: bool = True,
        lb_coef: float = 0.01,
        dispatch: str = "auto",
        lambda_range: Sequence[float] = (0.5, 1.0),
        lambda_bias_init: float = 2.0,
        dynamic_img_size: bool = False,
        num_classes: int = 0,
        anchor: bool = True,
        conditioning: str = "film",
        wide_layers: Sequence[int] = (),
        wide_hidden: int = 0,
        expert_init: str = "copy",
        context_init_std: float = 0.02,
    ) -> None:
        img_size = (
            (img_size, img_size) if isinstance(img_size, int) else cast("tuple[int, int]", tuple(img_size))
        )
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            dynamic_img_size=dynamic_img_size,
        )
        self.moe_layers = tuple(sorted(int(i) for i in moe_layers))
        if not self.moe_layers and tap_layers is None:
            raise ValueError("moe_layers=() (a dense student) needs tap_layers (they default to moe_layers)")
        self.tap_layers = tuple(
            sorted(int(i) for i in (self.moe_layers if tap_layers is None else tap_layers))
        )
        self.wide_layers = tuple(sorted(int(i) for i in wide_layers))
        self.wide_hidden = int(wide_hidden)
        both = sorted(set(self.wide_layers) & set(self.moe_layers))
        if both:
            raise ValueError(f"wide_layers and moe_layers both name blocks {both}")
        if self.wide_layers and self.wide_hidden < int(embed_dim * mlp_ratio):
            raise ValueError(
                f"wide_hidden={wide_hidden} must be at least the MLP's {int(embed_dim * mlp_ratio)} hidden "
                f"units when wide_layers={list(self.wide_layers)} are given"
            )
        for name, idx in (
            ("moe_layers", self.moe_layers),
            ("tap_layers", self.tap_layers),
            ("wide_layers", self.wide_layers),
        ):
            bad = [i for i in idx if not 0 <= i < depth]
            if bad:
                raise ValueError(f"{name} {list(idx)} has indices outside the {depth} blocks: {bad}")
        if not self.tap_layers:
            raise ValueError("tap_layers must name at least one block")
        self.teacher_dims = tuple(int(c) for c in teacher_dims)
        self.num_teachers = len(self.teacher_dims)
        self.num_tasks = int(num_tasks)
        self.moe_config = MoEConfig(
            num_experts=num_experts,
            top_k=top_k,
            expert_mlp_ratio=mlp_ratio if expert_mlp_ratio is None else expert_mlp_ratio,
            shared_expert=shared_expert,
            expert_dropout=expert_dropout,
            noisy_gating=noisy_gating,
            double_weighting=double_weighting,
            lb_coef=lb_coef,
            backend=dispatch,
            conditioning=conditioning,
            expert_init=expert_init,
        )
        for i in self.moe_layers:
            self.blocks[i] = DualStreamBlock(
                cast(Block, self.blocks[i]),
                self.moe_config,
                cast("tuple[float, float]", tuple(lambda_range)),
                lambda_bias_init,
                anchor=anchor,
            )
        for i in self.wide_layers:
            self.blocks[i].mlp = net2net_widen(cast(Mlp, self.blocks[i].mlp), self.wide_hidden)
        self.teacher_embed = nn.Embedding(self.num_teachers, embed_dim)
        # No empty task table in Stage 1: a parameter that never receives a gradient would force DDP's
        # find_unused_parameters.
        self.task_embed = nn.Embedding(self.num_tasks, embed_dim) if self.num_tasks else None
        for table in (self.teacher_embed, self.task_embed):
            if table is not None:
                trunc_normal_(table.weight, std=context_init_std)
                # Without a context-conditioned router nothing reads the tables: frozen, so that no
                # parameter goes without a gradient (DDP) and the optimiser leaves them alone.
                table.requires_grad_(self.uses_context)
        self.projectors = (
            nn.ModuleList(
                nn.ModuleList(ProjectorHead(embed_dim, c) for _ in self.tap_layers) for c in self.teacher_dims
            )
            if projectors
            else None
        )

    # ------------------------------------------------------------------ inputs
    def context_table(self, kind: ContextKind) -> nn.Embedding:
        """The embedding table that ``kind`` ids index."""
        if kind == "teacher":
            return self.teacher_embed
        if kind == "task":
            if self.task_embed is None:
                raise ValueError(
                    "this model has no task contexts (num_tasks=0); build it with num_tasks=T for Stage 2"
                )
            return self.task_embed
        raise ValueError(f"context kind must be 'teacher' or 'task', got {kind!r}")

    def _check_images(self, x: Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got a tensor of shape {tuple(x.shape)}")
        _, c, h, w = x.shape
        if c != self.patch_embed.proj.in_channels:
            raise ValueError(f"expected {self.patch_embed.proj.in_channels} input channels, got {c}")
        if not self.dynamic_img_size and (h, w) != tuple(self.patch_embed.img_size):
            exp_h, exp_w = self.patch_embed.img_size
            raise ValueError(
                f"expected {exp_h}x{exp_w} images (the model's img_size), got {h}x{w}; build the model with "
                f"img_size=({h}, {w}) (position embeddings are resampled when weights are loaded) "
                "or with dynamic_img_size=True"
            )

    def _context_ids(self, context: Context, b: int, kind: ContextKind, device: torch.device) -> Tensor:
        """``context`` as (b,) int64 ids on ``device``, range-checked where that needs no device read.

        Ids given on the host (an int, a sequence of ints, a CPU tensor) are checked there, before they
        are moved. Ids already on an accelerator are checked only when :attr:`check_device_ids` is set:
        reading them back would make every forward wait for the device. Under ``torch.compile`` tensor ids
        are not checked (the check would break the graph).
        """
        n = self.context_table(kind).num_embeddings
        if context is None:
            if self.uses_context:
                raise ValueError(
                    f"this model routes by context: give {kind} ids (one per sample, or one for the batch)"
                )
            context = 0
        if isinstance(context, int):
            if not 0 <= context < n:
                raise ValueError(f"{kind} context ids must be in [0, {n}) for this model, got {context}")
            return torch.full((b,), context, dtype=torch.long, device=device)
        if not isinstance(context, Tensor):
            try:
                context = torch.as_tensor(context)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(
                    f"context must be an int, a sequence of ints or an integer tensor of shape ({b},), got "
                    f"{context!r}"
                ) from None
        if context.dtype not in (torch.int64, torch.int32) or context.shape != (b,):
            raise ValueError(
                f"context must be an integer tensor of shape ({b},) (one {kind} id per sample), "
                f"got dtype {context.dtype} and shape {tuple(context.shape)}"
            )
        checkable = context.device.type == "cpu" or self.check_device_ids
        if checkable and not torch.compiler.is_compiling() and bool(((context < 0) | (context >= n)).any()):
            raise ValueError(f"{kind} context ids must be in [0, {n}) for this model, got {context.tolist()}")
        return context.to(device=device, dtype=torch.long, non_blocking=True)

    # ------------------------------------------------------------------ forward
    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        context: Context = None,
        kind: ContextKind = "teacher",
        *,
        return_routing: bool = False,
    ) -> PrismOutput:
        """The feature taps of images ``x`` (B, C, H, W) under ``context`` ids, and the aux loss.

        ``context``: one ``kind`` id per sample ((B,) tensor or sequence) or one int for the whole batch;
        ``None`` only for a model whose output does not depend on it (:attr:`uses_context` false).
        ``return_routing``: also return each dual-stream block's routing and λ (``PrismOutput.routing``).
        The blocks after the last feature tap are not run.
        """
        self._check_images(x)
        ids = self._context_ids(context, x.shape[0], kind, x.device)
        cond = self.context_table(kind)(ids)
        last = self.tap_layers[-1]
        _, outs, aux, routing = self._run_blocks(self._embed(x), cond, 0, last, self.tap_layers)
        return PrismOutput([self.norm(t) for t in outs], aux, ids, kind, routing if return_routing else None)

    def forward_contexts(
        self, x: Tensor, contexts: Sequence[int], kind: ContextKind = "task", *, return_routing: bool = False
    ) -> PrismOutput:
        """One pass per context id (for the whole batch), batched context-major as (T·B, N, D) taps.

        Nothing before the first dual-stream block's routing depends on the context: the blocks before it,
        and its attention, λ, anchor, shared expert and router input gate, run once for all passes. The
        load-balancing loss is balanced per pass and averaged.
        """
        out = self.forward_passes(x, [(kind, int(c)) for c in contexts], return_routing=return_routing)
        return replace(out, aux_loss=out.aux_loss.mean())

    def forward_passes(
        self, x: Tensor, passes: Sequence[tuple[ContextKind, Context]], *, return_routing: bool = False
    ) -> PrismOutput:
        """Several passes over the same images, each with its own contexts, sharing the context-free work.

        ``passes`` holds (kind, context) pairs, the context one id for the whole batch or one per sample —
        e.g. every task pass of Stage 2 plus its teacher pass. Returns the taps batched pass-major,
        (P·B, N, D), and the load-balancing loss of each pass, (P,), each balanced on its own as if it had
        been a separate forward. The results equal P separate forward calls up to floating-point
        reordering (and, in training, the random draws of expert dropout and noisy gating).
        """
        if not passes:
            raise ValueError("forward_passes needs at least one (kind, context) pass")
        p, b = len(passes), x.shape[0]
        self._check_images(x)
        ids = torch.cat([self._context_ids(c, b, kind, x.device) for kind, c in passes])
        kinds = {kind for kind, _ in passes}
        # Routing statistics group samples by context id, which is only meaningful within one kind.
        kind = passes[0][0] if len(kinds) == 1 else None
        cond = torch.cat([self.context_table(k)(ids[i * b : (i + 1) * b]) for i, (k, _) in enumerate(passes)])
        last = self.tap_layers[-1]
        if not self.routed_layers:  # no routing up to the last tap: every pass computes the same taps
            _, outs, _, _ = self._run_blocks(self._embed(x), cond[:b], 0, last, self.tap_layers)
            taps = [self.norm(t).repeat(p, 1, 1) for t in outs]
            aux = x.new_zeros(p, dtype=torch.float32)
            return PrismOutput(taps, aux, ids, kind, {} if return_routing else None)
        first = self.routed_layers[0]
        h = self._embed(x)
        h, outs, _, _ = self._run_blocks(h, cond[:b], 0, first - 1, self.tap_layers)
        taps = [self.norm(t).repeat(p, 1, 1) for t in outs]
        block = cast(DualStreamBlock, self.blocks[first])
        h, aux, first_routing = self._call(block.forward_contexts, h, cond, p, True)
        if first in self.tap_layers:
            taps.append(self.norm(h))
        routing = {first: first_routing}
        if first < last:
            _, outs, rest_aux, rest = self._run_blocks(h, cond, first + 1, last, self.tap_layers, p, True)
            taps, aux = taps + [self.norm(t) for t in outs], aux + rest_aux
            routing.update(rest)
        return PrismOutput(taps, aux, ids, kind, routing if return_routing else None)

    def forward_features(  # type: ignore[override]
        self, x: Tensor, context: Context = None, kind: ContextKind = "teacher"
    ) -> Tensor:
        """timm's ``forward_features``: every block, then the final norm, (B, N, D) — context as for
        :meth:`forward`. ``forward_head`` then pools it (class token)."""
        self._check_images(x)
        cond = self.context_table(kind)(self._context_ids(context, x.shape[0], kind, x.device))
        h, _, _, _ = self._run_blocks(self._embed(x), cond, 0, len(self.blocks) - 1, ())
        return self.norm(h)

    def forward_intermediates(  # type: ignore[override]
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        *,
        context: Context = None,
        kind: ContextKind = "teacher",
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]] | dict[str, Any]:
        """timm's ``forward_intermediates``, with the ``context`` ids (and their ``kind``) as for
        :meth:`forward`.

        ``indices``: the last n blocks if an int, every block if ``None``, else those block indices;
        ``norm`` applies the final norm to them (PRISM's taps are normed); ``output_fmt`` ``"NCHW"``
        (patch tokens as maps) or ``"NLC"``. Returns the intermediates (``intermediates_only``), or the
        final normed tokens and the intermediates, or timm's dictionary (``output_dict``).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        self._check_images(x)
        cond = self.context_table(kind)(self._context_ids(context, x.shape[0], kind, x.device))
        take, max_index = feature_take_indices(len(self.blocks), _as_indices(indices))
        stop = max_index if stop_early or intermediates_only else len(self.blocks) - 1
        h, feats, _, _ = self._run_blocks(self._embed(x), cond, 0, stop, take)
        if norm:
            feats = [self.norm(f) for f in feats]
        prefix = [f[:, : self.num_prefix_tokens] for f in feats] if self.num_prefix_tokens else None
        feats = [f[:, self.num_prefix_tokens :] for f in feats]
        if output_fmt == "NCHW":
            gh, gw = self.patch_embed.dynamic_feat_size(x.shape[-2:])
            feats = [f.reshape(x.shape[0], gh, gw, -1).permute(0, 3, 1, 2).contiguous() for f in feats]
        if output_dict:
            result: dict[str, Any] = {"image_intermediates": feats}
            if prefix is not None and return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                result["image_features"] = self.norm(h)
            return result
        out: list[Any] = list(zip(feats, prefix, strict=True)) if return_prefix_tokens and prefix else feats
        return out if intermediates_only else (self.norm(h), out)

    def get_intermediate_layers(  # type: ignore[override]
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        *,
        context: Context = None,
        kind: ContextKind = "teacher",
    ) -> list[Tensor]:
        """timm's (DINO's) ``get_intermediate_layers``, with the context as for :meth:`forward`."""
        return cast(
            "list[Tensor]",
            self.forward_intermediates(
                x,
                n,
                return_prefix_tokens=return_prefix_tokens,
                norm=norm,
                output_fmt="NCHW" if reshape else "NLC",
                intermediates_only=True,
                context=context,
                kind=kind,
            ),
        )

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (timm's, for ``features_only``); they become the
        feature taps. ``prune_head`` also drops the projector heads (and any classifier)."""
        take, max_index = feature_take_indices(len(self.blocks), _as_indices(indices))
        if not prune_head and self.projectors is not None and tuple(take) != self.tap_layers:
            raise ValueError(
                f"pruning to blocks {list(take)} moves the feature taps {list(self.tap_layers)} that the "
                "projector heads follow: prune with prune_head=True"
            )
        self.blocks = self.blocks[: max_index + 1]
        self.moe_layers = tuple(i for i in self.moe_layers if i <= max_index)
        self.wide_layers = tuple(i for i in self.wide_layers if i <= max_index)
        self.tap_layers = tuple(sorted(take))
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.projectors = None
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return list(take)

    def _embed(self, x: Tensor) -> Tensor:
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))

    def _run_blocks(
        self,
        x: Tensor,
        cond: Tensor,
        start: int,
        stop: int,
        take: Collection[int],
        lb_groups: int = 1,
        per_group: bool = False,
    ) -> tuple[Tensor, list[Tensor], Tensor, dict[int, BlockRouting]]:
        """Blocks ``start``..``stop`` (inclusive) on tokens ``x``: the last output, the outputs of the
        blocks in ``take`` (no norm), the summed load-balancing loss and each dual-stream block's routing."""
        outs: list[Tensor] = []
        routing: dict[int, BlockRouting] = {}
        aux = x.new_zeros((lb_groups,) if per_group else (), dtype=torch.float32)
        for i in range(start, stop + 1):
            block = self.blocks[i]
            if isinstance(block, DualStreamBlock):
                x, layer_aux, routing[i] = self._call(block, x, cond, lb_groups, per_group)
                aux = aux + layer_aux
            else:
                x = self._call(block, x)
            if i in take:
                outs.append(x)
        return x, outs, aux, routing

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, under activation checkpointing when it is on and gradients are recorded.

        The random draws of expert dropout and router noise are replayed in the recomputation, so the
        gradients are those of the plain forward.
        """
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    # ------------------------------------------------------------------ projections
    def grid_size(self, x_or_hw: Tensor | tuple[int, int]) -> tuple[int, int]:
        """Patch grid (h, w) for an input tensor or an (H, W) size."""
        hw = tuple(x_or_hw.shape[-2:]) if isinstance(x_or_hw, Tensor) else tuple(x_or_hw)
        return self.patch_embed.dynamic_feat_size(hw) if self.dynamic_img_size else self.patch_embed.grid_size

    def to_maps(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """(B, N, C) tokens → (B, C, h, w) map of the patch tokens (prefix tokens dropped)."""
        patches = tokens[:, self.num_prefix_tokens :]
        return patches.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)

    def project(self, taps: Sequence[Tensor], teacher: int, grid: tuple[int, int]) -> list[Tensor]:
        """Project every tap into teacher ``teacher``'s feature space: per tap (B, C_teacher, h, w)."""
        if self.projectors is None:
            raise RuntimeError("this model was built with projectors=False")
        heads = cast(nn.ModuleList, self.projectors[teacher])
        return [self.to_maps(head(t), grid) for head, t in zip(heads, taps, strict=True)]

    def project_by_teacher(
        self, taps: Sequence[Tensor], teacher_ids: Tensor, grid: tuple[int, int]
    ) -> dict[int, list[Tensor]]:
        """Each sample projected for its own teacher: {teacher id (ascending): per tap (B_t, C, h, w)}."""
        out: dict[int, list[Tensor]] = {}
        for t in torch.unique(teacher_ids).tolist():
            rows = (teacher_ids == t).nonzero().squeeze(1).to(taps[0].device)
            out[int(t)] = self.project([tap.index_select(0, rows) for tap in taps], int(t), grid)
        return out

    def absent_heads_term(self, present: Iterable[int]) -> Tensor:
        """A zero that depends on the projector heads of every teacher not in ``present``.

        Added to a loss whose batch lacks some teachers, it brings their heads into the graph with zero
        gradients, so DDP needs no ``find_unused_parameters`` (FSDP2 needs no such help).
        """
        if self.projectors is None:
            raise RuntimeError("this model was built with projectors=False")
        absent = sorted(set(range(len(self.projectors))) - set(present))
        params = [p for t in absent for p in self.projectors[t].parameters()]
        return 0.0 * sum((p.sum() for p in params), self.teacher_embed.weight.new_zeros(()))

    # ------------------------------------------------------------------ introspection
    @property
    def dual_stream_blocks(self) -> list[DualStreamBlock]:
        return [cast(DualStreamBlock, self.blocks[i]) for i in self.moe_layers]

    @property
    def routed_layers(self) -> tuple[int, ...]:
        """Indices of the dual-stream blocks the forward runs: those up to the last feature tap."""
        return tuple(i for i in self.moe_layers if i <= self.tap_layers[-1])

    @property
    def routed_blocks(self) -> list[DualStreamBlock]:
        """The dual-stream blocks the forward runs, in the order of :attr:`routed_layers`."""
        return [cast(DualStreamBlock, self.blocks[i]) for i in self.routed_layers]

    @property
    def uses_context(self) -> bool:
        """Whether the output depends on the context ids (some router reads the context tables)."""
        return bool(self.moe_layers) and self.moe_config.conditioning != "none"

    @torch.no_grad()
    def trace(self, x: Tensor, context: Context, kind: ContextKind = "teacher") -> dict[str, Any]:
        """One forward pass with everything the analysis tools and conformance tests read.

        Returns ``taps`` (list of (B, N, D)); per MoE layer the forward runs (block indices under
        ``layers``, see :attr:`routed_layers`) ``router_logits`` (B, N, E, the values top-k was taken of),
        ``topk`` (B, N, k, ``torch.topk`` order), ``topk_weights`` (B, N, k) and ``lambda`` (B, N, 1);
        ``aux_loss``; and, for teacher contexts on a model with projector heads, ``projections``
        {teacher id: per tap (B_t, C, h, w)} computed on each sample's own teacher.
        """
        out = self(x, context, kind, return_routing=True)
        routing = list(cast("dict[int, BlockRouting]", out.routing).values())
        traced: dict[str, Any] = {
            "taps": out.taps,
            "layers": list(cast("dict[int, BlockRouting]", out.routing)),
            "router_logits": [r.logits for r in routing],
            "topk": [r.indices for r in routing],
            "topk_weights": [r.weights for r in routing],
            "lambda": [r.lam for r in routing],
            "aux_loss": out.aux_loss,
        }
        if kind == "teacher" and self.projectors is not None:
            traced["projections"] = self.project_by_teacher(out.taps, out.context, self.grid_size(x))
        return traced

    @torch.no_grad()
    def routing_stats(self, out: PrismOutput) -> dict[str, Any]:
        """Routing statistics of a forward's output (run with ``return_routing=True``), on its device.

        ``expert_counts``: per MoE layer the forward ran (block indices under ``layers``, see
        :attr:`routed_layers`) the (n_contexts, E) number of (token, expert) assignments with a positive
        weight per context id; ``lambda_mean``: per such layer (n_contexts,) mean λ over the tokens of each
        context (NaN for contexts absent from the batch); ``kind``: the context kind. Computed on the
        device without reading anything back.
        """
        if out.routing is None:
            raise ValueError("routing_stats needs the output of a forward run with return_routing=True")
        if out.kind is None:
            raise ValueError(
                "routing_stats needs contexts of one kind; the passes of this output mixed teacher and "
                "task contexts"
            )
        ids, kind = out.context, out.kind
        n_ctx = self.context_table(kind).num_embeddings
        e = self.moe_config.num_experts
        counts, lambdas = [], []
        for r in out.routing.values():
            b, n, _ = r.indices.shape
            bins = (ids.view(b, 1, 1) * e + r.indices).reshape(-1)
            used = (r.weights > 0).reshape(-1).to(torch.float32)
            counts.append(torch.zeros(n_ctx * e, device=ids.device).index_add_(0, bins, used).view(n_ctx, e))
            lam_sum = torch.zeros(n_ctx, device=ids.device).index_add_(0, ids, r.lam.float().sum((1, 2)))
            tokens = torch.zeros(n_ctx, device=ids.device).index_add_(
                0, ids, torch.full_like(ids, n, dtype=torch.float32)
            )
            lambdas.append(lam_sum / tokens)
        return {"kind": kind, "layers": list(out.routing), "expert_counts": counts, "lambda_mean": lambdas}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters split by origin for the Stage-1 learning rates (SPEC §6).

        ``new``: routed and shared experts, router, FiLM, λ gates, context tables, projector heads.
        ``pretrained``: patch/position embedding, attention, norms, dense MLPs and the anchors.
        """
        # Widened MLPs stand in for the dual-stream blocks' new capacity, so they learn at its rate.
        new_prefixes = ("teacher_embed", "task_embed", "projectors") + tuple(
            f"blocks.{i}.mlp." for i in self.wide_layers
        )
        groups: dict[str, list[nn.Parameter]] = {"new": [], "pretrained": []}
        for name, p in self.named_parameters():
            is_new = name.startswith(new_prefixes) or ".moe." in name or ".lambda_gate." in name
            groups["new" if is_new else "pretrained"].append(p)
        return groups

    def routing_parameters(self) -> list[nn.Parameter]:
        """The parameters that carry the context into the routing: the context tables and every MoE router
        (FiLM, input gate, gate, noise) — what the ``router_lr_scale`` options speed up."""
        return [
            p
            for name, p in self.named_parameters()
            if name.startswith(("teacher_embed", "task_embed")) or ".moe.router." in name
        ]

    def count_parameters(self, active: bool = False, backbone_only: bool = False) -> int:
        """Parameters in total, or active for one token (only top-k of the routed experts run).

        ``backbone_only`` leaves out the projector heads and the context tables.
        """
        extras = ("projectors", "teacher_embed", "task_embed")
        total = sum(
            p.numel()
            for name, p in self.named_parameters()
            if not (backbone_only and name.startswith(extras))
        )
        if active:
            cfg = self.moe_config
            for block in self.dual_stream_blocks:
                per_expert = sum(p[0].numel() for p in block.moe.experts.parameters())
                total -= (cfg.num_experts - cfg.top_k) * per_expert
        return total

    # ------------------------------------------------------------------ loading
    def load_state_dict_resampled(
        self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False
    ) -> Any:
        """``load_state_dict`` that first resamples ``pos_embed`` (bicubic) to this model's patch grid."""
        state_dict = dict(state_dict)
        pos = state_dict.get("pos_embed")
        # Never None here: the model is built with timm's default learned position embedding.
        if pos is not None and pos.shape != cast(nn.Parameter, self.pos_embed).shape:
            state_dict["pos_embed"] = resample_pos_embed(
                pos, self.patch_embed.grid_size, self.num_prefix_tokens
            )
        return self.load_state_dict(state_dict, strict=strict, assign=assign)


def _as_indices(indices: int | Sequence[int] | None) -> int | list[int] | None:
    return indices if indices is None or isinstance(indices, int) else list(indices)


def resample_pos_embed(pos_embed: Tensor, grid: Sequence[int], num_prefix_tokens: int = 1) -> Tensor:
    """Bicubic resampling (timm's) of a (1, prefix + h·w, D) position embedding to a new patch grid.

    The stored grid is taken as square, as in every released checkpoint.
    """
    n = pos_embed.shape[1] - num_prefix_tokens
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"cannot infer the patch grid of a position embedding with {n} patch positions")
    return resample_abs_pos_embed(
        pos_embed, new_size=list(grid), old_size=[side, side], num_prefix_tokens=num_prefix_tokens
    )
