"""The paper's ablations and baselines (SPEC §14) as named changes to the Stage-1 and Stage-2 configurations.

A variant changes only what its definition says; preset, data, schedule and seed stay shared, so a sweep over
variants gives one comparable row each. Names join with ``+`` (``wo_anchor+top1``). Defaults are PRISM as
released; every switch is also a plain :class:`~prism_vfm.models.prism_vit.PrismViT` argument
(``student.overrides`` in a YAML config) or loss key.

===================  =========================================================================================
variant              definition (switches)
===================  =========================================================================================
``prism``            PRISM as released, the reference row (no change)
``dense``            w/o MoE: the dense ViT with the same taps (``moe_layers=()``, ``tap_layers`` = the
                     dual-stream indices)
``wide_dense``       iso-FLOPs dense student: the MLPs of the dual-stream blocks widened to the block's active
                     FFN compute (:func:`iso_flops_hidden`), Net2Net-tiled from the pretrained MLP
                     (``moe_layers=()``, ``wide_layers``, ``wide_hidden``)
``wo_anchor``        MoE only, λ ≡ 0 (``anchor=False``)
``wo_film``          context concatenated to the router input instead of FiLM (``conditioning="concat"``)
``wo_shared``        no shared expert (``shared_expert=False``)
``vanilla_moe``      plain sparse MoE FFN: no anchor, no context in the router, no shared expert
                     (``anchor=False``, ``conditioning="none"``, ``shared_expert=False``)
``wo_decorrelation`` no decorrelation term, in both stages (``loss.decorrelation`` / ``distill.decorrelation``
                     = ``none``)
``decorr_taps<t>``   decorrelation on taps ``t``, e.g. ``decorr_taps0``, ``decorr_taps012``
                     (``loss.decorrelation_taps``, ``distill.decorrelation_taps``)
``top<k>``           top-k routing, e.g. ``top1`` … ``top4`` (``top_k``)
``experts<E>``       E routed experts, e.g. ``experts8``, ``experts24`` (``num_experts``)
``lite``             PRISM-lite: expert MLP ratio half the ViT's, i.e. 2 (``expert_mlp_ratio``)
``expert_ratio<r>``  expert MLP ratio r, e.g. ``expert_ratio1`` (``expert_mlp_ratio``)
``teachers<i>``      reduced teacher set: keep the configured teachers at positions ``i``, e.g. ``teachers02``
                     (``teachers.names``, ``distill.teachers``)
``dinov2_sam``       DINOv2 + SAM only, the official order's teachers 0 and 2 (= ``teachers02``)
===================  =========================================================================================

Stage 2 takes the architecture from its Stage-1 checkpoint, so there a variant changes only the loss and
teacher keys; apply the same variant to both stages.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prism_vfm.config import ConfigError
from prism_vfm.distill.config import Stage1Config, StudentConfig
from prism_vfm.finetune.config import Stage2Config
from prism_vfm.models.prism_vit import PrismViT
from prism_vfm.models.registry import student_architecture

StudentChange = Callable[[Mapping[str, Any]], dict[str, Any]]
C = TypeVar("C", Stage1Config, Stage2Config)


@dataclass(frozen=True)
class Variant:
    """One ablation: student arguments computed from the base student's, loss keys, and kept teachers."""

    name: str
    description: str
    student: StudentChange | None = None
    loss: Mapping[str, Any] = field(default_factory=dict)
    teachers: tuple[int, ...] | None = None


def _fixed(**changes: Any) -> StudentChange:
    return lambda base: dict(changes)


def dual_stream_active_flops(args: Mapping[str, Any]) -> int:
    """Matmul FLOPs per token (2 per multiply-add, inference) of one dual-stream block's FFN path.

    Anchor MLP and λ gate; router input gate (FiLM only) and logits (on ``[u; c]``, 2D wide, with
    ``conditioning="concat"``); k routed experts and their weighted sum; shared expert. FiLM's projection
    runs once per sample, not per token, and is left out; biases are not counted.
    """
    d = int(args["embed_dim"])
    hidden = int(d * args["mlp_ratio"])
    ratio = args["expert_mlp_ratio"] if args["expert_mlp_ratio"] is not None else args["mlp_ratio"]
    expert = int(d * ratio)
    k, e = int(args["top_k"]), int(args["num_experts"])
    flops = 2 * d * e * (2 if args["conditioning"] == "concat" else 1) + k * (4 * d * expert + 2 * d)
    if args["anchor"]:
        flops += 4 * d * hidden + 2 * d
    if args["shared_expert"]:
        flops += 4 * d * expert
    if args["conditioning"] == "film":
        flops += 2 * d * d
    return flops


def iso_flops_hidden(args: Mapping[str, Any]) -> int:
    """Hidden width of a dense MLP (``4·D·H`` FLOPs per token) as costly as a dual-stream block's FFN."""
    return round(dual_stream_active_flops(args) / (4 * int(args["embed_dim"])))


def _dense(base: Mapping[str, Any]) -> dict[str, Any]:
    layers = list(base["moe_layers"])
    if not layers:
        raise ConfigError("the student has no dual-stream blocks (moe_layers is empty) to make dense")
    taps = base["tap_layers"] if base["tap_layers"] is not None else layers
    return {"moe_layers": [], "tap_layers": list(taps)}


def _lite(base: Mapping[str, Any]) -> dict[str, Any]:
    return {"expert_mlp_ratio": base["mlp_ratio"] / 2}


def _wide(base: Mapping[str, Any]) -> dict[str, Any]:
    return {**_dense(base), "wide_layers": list(base["moe_layers"]), "wide_hidden": iso_flops_hidden(base)}


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("prism", "PRISM as released"),
        Variant("dense", "w/o MoE (dense ViT, same taps)", _dense),
        Variant("wide_dense", "iso-FLOPs wide dense student (Net2Net-tiled MLPs)", _wide),
        Variant("wo_anchor", "w/o anchor (MoE only, λ ≡ 0)", _fixed(anchor=False)),
        Variant("wo_film", "w/o FiLM (context concatenated to router input)", _fixed(conditioning="concat")),
        Variant("wo_shared", "w/o shared expert", _fixed(shared_expert=False)),
        Variant(
            "vanilla_moe",
            "vanilla sparse MoE (no anchor, no context, no shared expert)",
            _fixed(anchor=False, conditioning="none", shared_expert=False),
        ),
        Variant("wo_decorrelation", "w/o decorrelation", loss={"decorrelation": "none"}),
        Variant("lite", "PRISM-lite (expert MLP ratio halved)", _lite),
        Variant("dinov2_sam", "teachers DINOv2 + SAM", teachers=(0, 2)),
    )
}

_PATTERNS: list[tuple[str, Callable[[str], Variant]]] = [
    (r"top(\d+)", lambda m: Variant(f"top{m}", f"top-{m} routing", _fixed(top_k=int(m)))),
    (r"experts(\d+)", lambda m: Variant(f"experts{m}", f"{m} routed experts", _fixed(num_experts=int(m)))),
    (
        r"decorr_taps(\d+)",
        lambda m: Variant(
            f"decorr_taps{m}",
            f"decorrelation on taps {{{', '.join(m)}}}",
            loss={"decorrelation_taps": tuple(int(c) for c in m)},
        ),
    ),
    (
        r"expert_ratio(\d+(?:\.\d+)?)",
        lambda m: Variant(f"expert_ratio{m}", f"expert MLP ratio {m}", _fixed(expert_mlp_ratio=float(m))),
    ),
    (
        r"teachers(\d+)",
        lambda m: Variant(f"teachers{m}", f"teachers {', '.join(m)}", teachers=tuple(int(c) for c in m)),
    ),
]


def variant(name: str) -> Variant:
    """The named variant (one name, no ``+``); unknown names are a ConfigError listing the valid ones."""
    if name in VARIANTS:
        return VARIANTS[name]
    for pattern, make in _PATTERNS:
        m = re.fullmatch(pattern, name)
        if m:
            return make(m.group(1))
    patterns = ", ".join(p.replace(r"(\d+)", "<n>").replace(r"(\d+(?:\.\d+)?)", "<r>") for p, _ in _PATTERNS)
    raise ConfigError(f"unknown ablation {name!r}; expected one of {', '.join(VARIANTS)} or {patterns}")


def describe(name: str) -> str:
    """One line saying what a (possibly ``+``-joined) variant changes."""
    return "; ".join(variant(part).description for part in name.split("+"))


def base_student_args(cfg: StudentConfig) -> dict[str, Any]:
    """Every :class:`PrismViT` argument of a Stage-1 student configuration (defaults filled in)."""
    defaults = {
        k: p.default
        for k, p in inspect.signature(PrismViT.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return {**defaults, **student_architecture(cfg.model), **cfg.overrides, "img_size": cfg.img_size}


def apply_ablation(cfg: C, name: str) -> C:
    """A copy of a Stage-1 or Stage-2 configuration with the variant ``name`` (``a+b`` applies both) applied.

    Raises ConfigError, naming the variant, the key and the value, when the result cannot be built (e.g.
    ``top4`` with 3 experts, decorrelation on a tap the student lacks, a teacher position out of range).
    """
    if not isinstance(cfg, (Stage1Config, Stage2Config)):
        raise TypeError(f"apply_ablation takes a Stage1Config or Stage2Config, got {type(cfg).__name__}")
    cfg = copy.deepcopy(cfg)
    for part in name.split("+"):
        v = variant(part)
        if isinstance(cfg, Stage1Config):
            _apply_stage1(cfg, v)
        else:
            for key, value in v.loss.items():
                setattr(cfg.distill, key, value)
            if v.teachers is not None:
                cfg.distill.teachers = _keep(cfg.distill.teachers, v, "distill.teachers")
    return cfg


def _apply_stage1(cfg: Stage1Config, v: Variant) -> None:
    if v.student is not None:
        try:
            changes = v.student(base_student_args(cfg.student))
        except ConfigError as exc:
            raise ConfigError(f"ablation {v.name!r}: {exc}") from None
        cfg.student.overrides = {**cfg.student.overrides, **changes}
    for key, value in v.loss.items():
        setattr(cfg.loss, key, value)
    if v.teachers is not None:
        cfg.teachers.names = _keep(cfg.teachers.names, v, "teachers.names")
    args = base_student_args(cfg.student)
    k, e = args["top_k"], args["num_experts"]
    if args["moe_layers"] and not 1 <= k <= e:
        raise ConfigError(f"ablation {v.name!r}: student.overrides.top_k={k} must be in [1, num_experts={e}]")
    ratio = args["expert_mlp_ratio"]
    if ratio is not None and ratio <= 0:
        raise ConfigError(f"ablation {v.name!r}: student.overrides.expert_mlp_ratio={ratio} must be positive")
    n_taps = len(args["tap_layers"] if args["tap_layers"] is not None else args["moe_layers"])
    taps = cfg.loss.decorrelation_taps
    if cfg.loss.decorrelation != "none" and any(t >= n_taps for t in taps):
        raise ConfigError(
            f"ablation {v.name!r}: loss.decorrelation_taps={list(taps)} names a tap the student lacks "
            f"(it has {n_taps} taps)"
        )


def _keep(names: tuple[str, ...], v: Variant, key: str) -> tuple[str, ...]:
    positions = v.teachers or ()
    bad = [i for i in positions if i >= len(names)]
    if bad or len(set(positions)) != len(positions):
        raise ConfigError(
            f"ablation {v.name!r}: {key}={list(names)} lacks distinct teachers at positions {list(positions)}"
        )
    return tuple(names[i] for i in positions)
