"""Released head state dicts (``fusion_model_state_dict``): key mapping and strict loading.

The released modules name the parts after their code (``pooling_layers``, ``dynamic_interaction``,
``mote``, ``head``, ``projection_head``); this package names them after the paper (``rgsta``, ``dbi``,
``experts`` + ``readout``, ``classifier``, ``projection``). The mapping is one table of key prefixes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from prism_vfm.video.config import HeadConfig, Variant
from prism_vfm.video.head import VidPrismHead

# (released key, our key): the start of a key, or the whole key when it ends in "$"; {i} and {j} stand for
# indices. Read in order in both directions; the first match decides.
_RENAMES = [
    ("pooling_layers.{i}.metric_proj.", "rgsta.{i}.metric_proj."),
    ("pooling_layers.{i}.score_head.0.", "rgsta.{i}.score_norm."),
    ("pooling_layers.{i}.score_head.1.", "rgsta.{i}.score."),
    ("dynamic_interaction.score_mlps.", "dbi.score_mlps."),
    ("dynamic_interaction.slow2fast.proj.", "dbi.slow_to_fast."),
    ("dynamic_interaction.fast2slow_ops.{i}->{j}.tconv.", "dbi.fast_to_slow.{i}to{j}."),
    ("mote.experts.{i}.attn.", "experts.{i}.attn."),
    ("mote.experts.{i}.ln_1.", "experts.{i}.norm1."),
    ("mote.experts.{i}.ffn.", "experts.{i}.ffn."),
    ("mote.experts.{i}.ln_2.", "experts.{i}.norm2."),
    ("mote.readout_gate.global_query$", "readout.query$"),
    ("mote.readout_gate.attn.", "readout.attn."),
    ("mote.readout_gate.ln.", "readout.norm."),
    ("head.", "classifier."),
    ("projection_head.", "projection."),
]


def _rule(source: str, target: str) -> tuple[str, str]:
    """A ``re.sub`` pattern and replacement for one rename."""
    whole = source.endswith("$")
    pattern = (
        re.escape(source.removesuffix("$")).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    )
    replacement = target.removesuffix("$").replace("{i}", r"\g<i>").replace("{j}", r"\g<j>")
    return pattern + ("$" if whole else ""), replacement


_TO_OURS = [_rule(released, ours) for released, ours in _RENAMES]
_TO_RELEASED = [_rule(ours, released) for released, ours in _RENAMES]
RELEASED_RATES = (2, 4, 8, 16)


def _rename(key: str, table: list[tuple[str, str]]) -> str | None:
    for pattern, replacement in table:
        renamed, count = re.subn("^" + pattern, replacement, key)
        if count:
            return renamed
    return None


def to_head_key(released_key: str) -> str | None:
    """Our key for a released head key, or None when it is not one."""
    return _rename(released_key, _TO_OURS)


def to_released_key(key: str) -> str:
    """The released key for one of :class:`VidPrismHead`'s state-dict keys."""
    renamed = _rename(key, _TO_RELEASED)
    if renamed is None:
        raise KeyError(f"{key!r} is not a VidPrismHead state-dict key")
    return renamed


def to_released_state_dict(head: VidPrismHead) -> dict[str, Tensor]:
    """The head's weights under the released names (a ``fusion_model_state_dict``)."""
    return {to_released_key(k): v for k, v in head.state_dict().items()}


def _unwrap(state_dict: Mapping[str, object]) -> dict[str, Tensor]:
    """Accept a bare head state dict, a released training checkpoint, or DDP-prefixed keys."""
    inner = state_dict.get("fusion_model_state_dict", state_dict)
    if not isinstance(inner, Mapping):
        raise ValueError("fusion_model_state_dict of the checkpoint is not a state dict")
    sd = dict(inner)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd  # type: ignore[return-value]


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def head_config_from_released(
    state_dict: Mapping[str, Tensor], rates: tuple[int, ...] | None = None
) -> HeadConfig:
    """The :class:`HeadConfig` a released head state dict describes: variant, width, classes, rates.

    The rates leave no trace in the weights except which streams are fast (they have fast→slow
    convolutions) and slow; the released rates (2, 4, 8, 16) are taken when that structure fits them,
    otherwise ``rates`` must be given."""
    keys = sorted(state_dict)
    proj = state_dict.get("pooling_layers.0.metric_proj.weight")
    cls = state_dict.get("head.weight")
    if proj is None or cls is None:
        raise ValueError(
            "not a released VidPrism head state dict (no pooling_layers.0.metric_proj.weight / head.weight); "
            f"its keys: {_listing(keys)}"
        )
    n = len({m.group(1) for k in keys if (m := re.match(r"pooling_layers\.(\d+)\.", k))})
    convs = [
        m.groups() for k in keys if (m := re.match(r"dynamic_interaction\.fast2slow_ops\.(\d+)->(\d+)", k))
    ]
    fast = sorted({int(i) for i, _ in convs})
    slow = sorted({int(j) for _, j in convs})
    if rates is None:
        if n != len(RELEASED_RATES) or fast != [0, 1] or slow != [2, 3]:
            raise ValueError(
                f"the state dict has {n} RgSTA modules, fast streams {fast} and slow streams {slow}, "
                f"which the released rates {RELEASED_RATES} do not fit; pass rates=... explicitly"
            )
        rates = RELEASED_RATES
    variant: Variant
    if "projection_head.3.weight" in state_dict:
        variant = "text"
    elif "projection_head.0.weight" in state_dict:
        variant = "closed"
    else:
        variant = "videomae"
    return HeadConfig(
        dim=int(proj.shape[0]),
        num_classes=int(cls.shape[0]),
        rates=tuple(rates),
        num_experts=len(rates),
        variant=variant,
    )


def load_official_head(
    state_dict: Mapping[str, Tensor], rates: tuple[int, ...] | None = None, **options: object
) -> VidPrismHead:
    """Build in eval mode the head a released state dict describes and load it strictly.

    ``state_dict`` is a released head state dict (``fusion_model_state_dict``; a whole training
    checkpoint holding one, or keys with a DDP ``module.`` prefix, are accepted too). Closed-set,
    text (zero-shot) and VideoMAE variants, width and classes are read from the keys; ``options`` are
    further :class:`HeadConfig` fields (for example ``dbi_update="sum"``)."""
    sd = _unwrap(state_dict)
    cfg = head_config_from_released(sd, rates)
    for name, value in options.items():
        if not hasattr(cfg, name):
            raise ValueError(f"load_official_head: {name!r} is not a HeadConfig field")
        setattr(cfg, name, value)
    cfg.__post_init__()
    head = VidPrismHead(cfg)
    ours = {}
    unknown = []
    for key, value in sd.items():
        mapped = to_head_key(key)
        if mapped is None:
            unknown.append(key)
        else:
            ours[mapped] = value
    expected = head.state_dict()
    missing = sorted(to_released_key(k) for k in expected if k not in ours)
    unexpected = sorted(
        unknown + [k for k in sd if to_head_key(k) is not None and to_head_key(k) not in expected]
    )
    if missing or unexpected:
        raise ValueError(
            f"the state dict does not describe a VidPrism head ({cfg.variant} variant, D={cfg.dim}): "
            f"missing {_listing(missing)}; unexpected {_listing(unexpected)}"
        )
    wrong = [
        f"{to_released_key(k)} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
        for k, v in ours.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise ValueError(f"released head state dict: shapes do not fit D={cfg.dim}: {_listing(wrong)}")
    head.load_state_dict(ours, strict=True)
    return head.eval()
