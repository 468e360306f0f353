"""Directories the trainer creates (the run directory, the data cache), with errors that name them."""

from __future__ import annotations

from pathlib import Path


def make_dir(path: str | Path, what: str) -> Path:
    """Create the directory ``path`` (and its parents) if it is missing, and return it.

    Args:
        path: the directory.
        what: what it is for, as the error message should call it (``"run directory"``).

    Raises:
        ValueError: ``cannot create <what> <path>: <reason>``, when ``path`` or one of its parents is
            a file, or the system refuses (permissions, a read-only or full file system).
    """
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        # "File exists" / "Not a directory" alone do not say which part of the path is in the way
        blocker = next((q for q in (p, *p.parents) if q.exists() and not q.is_dir()), None)
        reason = f"{blocker} is a file, not a directory" if blocker else (e.strerror or str(e))
        raise ValueError(f"cannot create {what} {p}: {reason}") from None
    return p
