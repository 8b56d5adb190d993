"""The one "inside this directory" check: user-given relative paths (``{"path": ...}`` datasets, local
Hugging Face dataset folders) must stay inside a root the operator chose. The API checks before queueing; the
worker checks again, because the file system may have changed since."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from core.errors import InvalidRequest


def resolve_inside(root: Path, relative: str, *, param: str, what: str = "path") -> Path:
    """``root / relative`` fully resolved; refuses absolute paths, '~', '..', backslashes and symlinks that
    lead out of ``root``. Does not check that the target exists."""
    pure = PurePosixPath(relative)
    if not relative or pure.is_absolute() or relative.startswith("~") or ".." in pure.parts or "\\" in relative:
        raise InvalidRequest(f"{what} {relative!r} must be relative to {root} without '..'", param=param)
    base = Path(root).resolve()
    path = (base / pure).resolve()
    if not path.is_relative_to(base):  # a symlink pointing out of the root
        raise InvalidRequest(f"{what} {relative!r} leads outside {base}", param=param)
    return path
