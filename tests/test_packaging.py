"""What an installed package promises: type information, its dependency floors, extras named per command."""

from __future__ import annotations

import re

import yaml

from tests.conftest import REPO_ROOT

PYPROJECT_TEXT = (REPO_ROOT / "pyproject.toml").read_text()


def _requirement(name: str) -> str:
    match = re.search(rf'^\s*"({re.escape(name)}\s*[<>=][^"]*)",?$', PYPROJECT_TEXT, re.MULTILINE)
    assert match, f"{name} is not a dependency in pyproject.toml"
    return match.group(1)


def _floor(requirement: str) -> tuple[int, ...]:
    version = re.search(r">=\s*([0-9.]+)", requirement)
    assert version, requirement
    return tuple(int(p) for p in version.group(1).split("."))


def test_torch_floor_has_the_apis_the_code_uses():
    deps = {name: _requirement(name) for name in ("torch", "torchvision")}
    # torch.distributed.fsdp.fully_shard (train/distributed.py) is public from PyTorch 2.6 on,
    # and torchvision 0.21 is the release built for it.
    assert _floor(deps["torch"]) >= (2, 6)
    assert _floor(deps["torchvision"]) >= (0, 21)
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"PyTorch ≥ {'.'.join(map(str, _floor(deps['torch'])))}" in readme


def test_type_information_is_shipped():
    assert (REPO_ROOT / "src/prism_vfm/py.typed").is_file()
    assert re.search(
        r'^\[tool\.setuptools\.package-data\]\nprism_vfm = \[[^]]*"py\.typed"', PYPROJECT_TEXT, re.M
    )


def test_readme_names_the_extra_of_every_command_that_needs_one():
    readme = (REPO_ROOT / "README.md").read_text()
    for extra, command in [("eval", "prism evaluate"), ("analysis", "prism analyze")]:
        assert re.search(rf"^{extra} = \[", PYPROJECT_TEXT, re.MULTILINE), extra
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{extra}` |"))
        assert command in row, row


def test_citation_file_names_both_papers():
    cff = yaml.safe_load((REPO_ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and f'version = "{cff["version"]}"' in PYPROJECT_TEXT
    titles = [cff["preferred-citation"]["title"], *(r["title"] for r in cff["references"])]
    spec_titles = [
        "PRISM: Synergizing Vision Foundation Models via Self-organized Expert Specialization",
        "VidPrism: Heterogeneous Mixture of Experts for Image-to-Video Transfer",
    ]
    assert titles == spec_titles
    assert "doi" not in str(cff).lower()
