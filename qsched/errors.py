"""The package's error and warning types: what a user did wrong, said in one line.

Every error qsched raises for bad input (an unknown name, an out-of-range or non-finite number, a missing,
truncated or corrupted file, an output that cannot be written) is a :class:`QSchedError`. It subclasses
``ValueError``, so callers that already catch ``ValueError`` keep working; the CLI turns it into one
``error: ...`` line and exit code 2. Anything else that escapes a command is a bug.

Input that is accepted but altered (a prompt truncated to the text encoder's length, a stored study larger than
asked) is reported with a :class:`QSchedWarning`, which the CLI prints as one ``warning: ...`` line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["QSchedError", "CorruptFileError", "OutputError", "QSchedWarning", "read_json"]


class QSchedError(ValueError):
    """Bad user input (the message names the offending value or file)."""


class CorruptFileError(QSchedError):
    """A file qsched reads is missing its expected content: truncated, binary, not JSON, or of the wrong shape."""


class OutputError(QSchedError):
    """An output cannot be written (full disk, read-only or missing directory); the old file, if any, is intact."""


class QSchedWarning(UserWarning):
    """Input was accepted but altered (e.g. truncated); the message says what and how."""


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Parse the JSON file ``path``; a binary, truncated or malformed file raises :class:`CorruptFileError`
    naming it (``what`` says which kind of file, e.g. "scheduler config")."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CorruptFileError(f"{what} {p} is not a text (JSON) file") from None
    except IsADirectoryError:
        raise CorruptFileError(f"{what} {p} is a directory, not a file") from None
    if not text.strip():
        raise CorruptFileError(f"{what} {p} is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{what} {p} is not valid JSON ({e.msg} at line {e.lineno}; truncated?)") from None
