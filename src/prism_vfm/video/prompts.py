"""The released prompt ensembles for class text embeddings (VIDPRISM_SPEC §1.8).

Every template has one ``{}`` for the class name, which is inserted verbatim (the tokenizer lower-cases).
"""

from __future__ import annotations

from collections.abc import Sequence

PREFIXES = ("a photo of", "a video of", "a example of", "a demonstration of")
PATTERNS = (
    "{}",
    "a person {}",
    "a person using {}",
    "a person doing {}",
    "a person during {}",
    "a person performing {}",
    "a person practicing {}",
)

# The default ensemble: 4 prefixes × 7 patterns, prefix-major, each ending with a full stop.
ENSEMBLE_28: tuple[str, ...] = tuple(f"{prefix} {pattern}." for prefix in PREFIXES for pattern in PATTERNS)

# Something-Something v2 (data sets whose name contains "ssv2").
SSV2_20: tuple[str, ...] = (
    "a video of {}.",
    "a person is {}.",
    "someone is {}.",
    "a demonstration of {}.",
    "an example of {}.",
    "a clip showing {}.",
    "a recording of {}.",
    "this is a video about {}.",
    "a scene of {}.",
    "footage of {}.",
    "a person performing the action of {}.",
    "a video demonstrating {}.",
    "a short clip of {}.",
    "someone performing {}.",
    "a video clip showing {}.",
    "an action of {}.",
    "a temporal sequence of {}.",
    "a person interacting with something by {}.",
    "someone manipulating objects by {}.",
    "a hand-object interaction of {}.",
)

# A single template the release defines and never uses; kept for comparisons.
SINGLE: tuple[str, ...] = ("This is a video about {}",)


def templates_for(dataset: str) -> tuple[str, ...]:
    """The ensemble the release uses for a data set: SSv2's 20 when its name contains "ssv2", else the 28."""
    return SSV2_20 if "ssv2" in dataset.lower() else ENSEMBLE_28


def expand(templates: Sequence[str], class_names: Sequence[str]) -> list[list[str]]:
    """Prompt strings, template-major: ``out[t][c] = templates[t]`` filled with ``class_names[c]``."""
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"template {t!r} must contain exactly one '{{}}' for the class name")
    return [[t.format(name) for name in class_names] for t in templates]
