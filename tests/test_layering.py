"""Imports run one way: data-set registry → data → layers/models → losses/metrics → train → stages →
evaluate/analysis → cli. Every import statement (lazy ones included) is read with ``ast``."""

from __future__ import annotations

import ast

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "src" / "prism_vfm"

# Lowest first: a module may import from its own unit and from units of strictly lower tiers. A unit is a
# package or a module; the longest matching name wins. The loader (models.load) and the timm registrations
# with their pretrained tags (models.registry) sit above what they read: the models, the official layout
# (compat) and the checkpoint folders (train.checkpoint); VidPrism registers its kinds of source with the
# loader from above it (video.load).
TIERS: list[set[str]] = [
    {"errors"},
    {"utils", "config", "data.registry", "data.labels"},
    {"data", "video.data"},
    {"layers"},
    {"models", "teachers"},
    {"video"},
    {"compat"},
    {"train.checkpoint"},
    {"models.load"},
    {"models.registry", "video.load"},
    {"losses"},
    {"metrics", "video.metrics"},
    {"train"},
    {"distill", "video.train_config"},
    {"finetune", "smoke", "video.train"},
    {"evaluate", "analysis"},
    {"video.evaluate", "video.expert_report"},
    {"ablation", "demo", "video.zeroshot"},
    {"video.fewshot"},
    {"video.demo"},
    {"cli", "__init__"},
]


def _unit(module: str) -> str:
    """The layering unit of a dotted module path below ``prism_vfm``."""
    for unit in sorted((u for tier in TIERS for u in tier), key=len, reverse=True):
        if module == unit or module.startswith(unit + "."):
            return unit
    raise AssertionError(f"prism_vfm.{module} is in no tier of the layering: add it to TIERS")


def _tier(module: str) -> int:
    unit = _unit(module)
    return next(i for i, tier in enumerate(TIERS) if unit in tier)


def _imports() -> list[tuple[str, str, int]]:
    """(importer, imported, line) for every import of a prism_vfm module inside the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        module = ".".join(p for p in parts if p != "__init__") or "__init__"
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import; write prism_vfm.…")
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("prism_vfm."):
                    target = name.removeprefix("prism_vfm.")
                    if any(target == u or target.startswith(u + ".") for t in TIERS for u in t):
                        found.append((module, target, node.lineno))
    return found


def test_every_module_has_a_tier():
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        _unit(".".join(p for p in parts if p != "__init__") or "__init__")


def test_imports_run_one_way():
    backwards = set()
    for importer, imported, line in _imports():
        if _unit(importer) == _unit(imported) or _tier(imported) < _tier(importer):
            continue
        backwards.add(f"prism_vfm.{importer}:{line} imports prism_vfm.{imported}")
    assert not backwards, "imports against the layering:\n" + "\n".join(sorted(backwards))


def test_model_code_knows_nothing_of_the_data_sets():
    """Layers and models take tensors; preprocessing constants come from their default configs (timm)."""
    wrong = [
        f"prism_vfm.{i}:{line} imports prism_vfm.{t}"
        for i, t, line in _imports()
        if _unit(i) in ("layers", "models") and _unit(t).split(".")[0] == "data"
    ]
    assert not wrong, wrong
