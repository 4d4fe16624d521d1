"""Finding the external tools the tests drive.

Outside CI a missing tool skips the tests that need it, naming the command
that installs it; with CI=true it fails them: CI must never pass by not
checking.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def missing(what: str, install: str) -> NoReturn:
    message = f"{what} is not installed; install it with: {install}"
    if in_ci():
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def executable(name: str, install: str, *candidates: Path) -> Path:
    """The path of `name`: the first existing candidate, else `name` on PATH."""
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found is None:
        missing(f"`{name}`", install)
    return Path(found)
