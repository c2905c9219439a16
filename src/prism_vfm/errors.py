"""The errors a user can act on: the command line prints them as one line, without a traceback."""

from __future__ import annotations


class PrismError(Exception):
    """Base of the errors caused by what a user gave (a file, a key, a value), not by a bug."""


class MissingExtraError(PrismError, ImportError):
    """An optional dependency is missing; the message names the ``pip install 'prism-vfm[extra]'`` line."""

    def __init__(self, feature: str, package: str, extra: str) -> None:
        super().__init__(f"{feature} needs {package}: pip install 'prism-vfm[{extra}]'")
        self.package, self.extra = package, extra
