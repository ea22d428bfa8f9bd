"""How every ``hearth`` command finds the settings of a running development stack.

One rule, for every subcommand: a value already in the environment wins; whatever the environment
lacks is taken from the stack's env file, which the local launcher writes when it starts the
infrastructure. The file is, in order of precedence:

1. ``--env-file PATH`` (an error when it does not exist);
2. ``HEARTH_ENV_FILE`` (an error when it does not exist);
3. ``.run/hearth.env`` in the current directory;
4. ``.run/hearth.env`` of the checkout this code runs from.

Nothing here is printed: the file holds development secrets.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = Path(".run") / "hearth.env"


class EnvFileError(RuntimeError):
    pass


def locate(path: str | None = None) -> Path | None:
    """The env file the rule above selects, or None when there is none."""
    explicit = path or os.environ.get("HEARTH_ENV_FILE")
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise EnvFileError(f"env file {p} not found")
        return p
    for candidate in (Path.cwd() / DEFAULT, ROOT / DEFAULT):
        if candidate.is_file():
            return candidate
    return None


def parse(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines; blank lines and ``#`` comments are skipped."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if sep and key.strip():
            values[key.strip()] = value.strip()
    return values


def load(path: str | None = None) -> Path | None:
    """Fill what the environment lacks from the selected env file; return the file used."""
    found = locate(path)
    if found is not None:
        for key, value in parse(found.read_text()).items():
            os.environ.setdefault(key, value)
    return found
