"""Where a name that comes from a request may point: the one rule for every path a client sends.

- ``{"path": ...}`` datasets and ``hf_dataset`` names are resolved inside ``<data_dir>/datasets`` (symlinks
  resolved, then checked to stay inside); an ``hf_dataset`` may be a hub id only where the operator allows it
  (``BONE_ALLOW_HUB_DATASETS``).
- ``base_model`` is the server's own base model, an absolute directory inside the allowed model dirs (the data
  dir and ``BONE_ALLOWED_MODEL_DIRS``), or a Hugging Face id.

Nothing is ever resolved against a process's working directory. ``datasets.load_dataset`` and
``from_pretrained`` both try a name as a local path before the hub, so a hub id that happens to name something
under the working directory is refused. Every refusal of a name says the same words whether or not anything
exists there, and never shows a server path: the answer is no oracle for the server's file system.

The API checks before queueing (app/job_checks.py); the worker checks again with the same functions
(worker/data.py, core/base_model.py), because the file system may have changed since.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import tempfile
from pathlib import Path, PurePosixPath

from core.errors import InvalidRequest

# A Hugging Face repo id: "name" or "namespace/name" (the hub's own characters; no "..", no third part). An
# ``hf_dataset`` name has this shape whether it names a hub dataset or a folder in the datasets dir.
DATASET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$"
_HUB_ID = re.compile(DATASET_NAME_PATTERN)
MAX_HUB_ID_CHARS = 256


def check_dataset_name(name: str) -> str:
    """The shape of an ``hf_dataset`` name, "name" or "namespace/name": the request model's check. The worker
    applies the same shape in ``dataset_source`` (a record stored under an older rule meets it there, refused
    with the one message every unavailable name gets)."""
    if not _HUB_ID.match(name):
        raise ValueError(
            f"hf_dataset {name!r} must be 'name' or 'namespace/name' (letters, digits, '.', '_', '-'): "
            "a dataset folder named relative to the data dir's datasets folder, or a hub id"
        )
    return name


def resolve_inside(root: Path, relative: str, *, param: str, what: str = "path") -> Path:
    """``root / relative`` fully resolved; refuses absolute paths, '~', '..', backslashes and symlinks that
    lead out of ``root`` (one message for all of them). Does not check that the target exists."""
    path = inside_or_none(root, relative)
    if path is None:
        raise InvalidRequest(
            f"{what} {relative!r} must name something inside {_root_label(root)}, relative to it and without '..'",
            param=param,
        )
    return path


def inside_or_none(root: Path, relative: str) -> Path | None:
    pure = PurePosixPath(relative)
    if (
        not relative
        or pure.is_absolute()
        or relative.startswith("~")
        or ".." in pure.parts
        or "\\" in relative
        or "\x00" in relative
    ):
        return None
    base = Path(root).resolve()
    try:
        path = (base / pure).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return None
    return path if path.is_relative_to(base) else None  # a symlink pointing out of the root


def is_hub_id(name: str) -> bool:
    """A well-formed hub id that no loader would take for a local path first."""
    if len(name) > MAX_HUB_ID_CHARS or not _HUB_ID.match(name) or ".." in name:
        return False
    try:
        return not Path(name).exists()  # relative to the working directory: what the loaders would try first
    except OSError:
        return False


def _answers(check) -> bool:
    """``check()`` (``Path.is_file``, ``is_dir``), False where the name cannot be asked about at all: pathlib only
    swallows "no such file", so a name over the filesystem's limit (ENAMETOOLONG) would be a 500."""
    try:
        return check()
    except OSError:
        return False


def dataset_source(name: str, *, datasets_dir: Path, allow_hub: bool, param: str) -> str:
    """What ``datasets.load_dataset`` gets for ``hf_dataset``: a folder inside the datasets dir,
    else, where the operator allows hub datasets, the hub id."""
    if _HUB_ID.match(name):  # the shape the request model requires (check_dataset_name), here for older records
        local = inside_or_none(datasets_dir, name)
        if local is not None and _answers(local.is_dir):
            return str(local)
        if allow_hub and is_hub_id(name):
            return name
    hub = " or a Hugging Face dataset id" if allow_hub else " (hub datasets are off: BONE_ALLOW_HUB_DATASETS)"
    raise InvalidRequest(
        f"hf_dataset {name!r} is not available: name a dataset folder inside the data dir's "
        f"datasets folder, relative to it{hub}",
        param=param,
        code="dataset_not_allowed",
    )


def dataset_file(relative: str, *, datasets_dir: Path, suffixes: tuple[str, ...], param: str) -> Path:
    """The file a ``{"path": ...}`` dataset names: an existing JSONL/CSV/Parquet file inside the datasets dir."""
    path = inside_or_none(datasets_dir, relative)
    if path is None or not _answers(path.is_file):
        raise InvalidRequest(
            f"dataset path {relative!r} is not available: name a file inside the data dir's datasets "
            "folder, relative to it",
            param=param,
            code="dataset_not_allowed",
        )
    if path.suffix.lower() not in suffixes:
        raise InvalidRequest(f"dataset file {relative!r} must be one of {', '.join(suffixes)}", param=param)
    return path


def local_model_dir(name: str, allowed_roots: list[Path]) -> Path | None:
    """An absolute request path that resolves (symlinks followed) to a model folder inside an allowed root."""
    if not name.startswith("/") or "\x00" in name:
        return None
    try:
        path = Path(name).resolve()
    except (OSError, RuntimeError):
        return None
    roots = [Path(root).expanduser().resolve() for root in allowed_roots]
    if not any(path.is_relative_to(root) for root in roots):
        return None
    return path if _answers((path / "config.json").is_file) else None


def base_model_not_allowed(name: str, param: str) -> InvalidRequest:
    # The name is not echoed: the error handler redacts server paths in messages, which would make the echo
    # differ between names (and the reply must not differ with what exists on the server).
    return InvalidRequest(
        "this base model is not available: use the server's base model, a Hugging Face id, "
        "or the absolute path of a model folder (with config.json) inside the allowed model "
        "directories (the data dir and BONE_ALLOWED_MODEL_DIRS)",
        param=param,
        code="base_model_not_allowed",
    )


def _root_label(root: Path) -> str:
    return f"the data dir's {Path(root).name} folder"


def redact_server_paths(text: str, data_dir: Path) -> str:
    """``text`` without the server's absolute paths, for messages that leave the server: a path inside the
    data dir becomes relative to it (``datasets/x.jsonl``), any other under a known server root (temporary
    files, the installation, the working directory, home) becomes ``<server>/...``."""
    if "/" not in text:
        return text
    pattern, shown = _server_roots(str(Path(data_dir)))

    def replace(match: re.Match) -> str:
        prefix = shown[match.group(1)]
        return prefix if match.group(2) else (prefix.rstrip("/") or "<data dir>")

    return pattern.sub(replace, text)


@functools.lru_cache(maxsize=8)
def _server_roots(data_dir: str) -> tuple[re.Pattern, dict[str, str]]:
    """One pattern for every root (longest first, one pass, so nothing is replaced twice): a root followed by
    ``/`` or by the end of the path."""
    roots = {data_dir: "", str(Path(data_dir).resolve()): ""}
    for other in (
        tempfile.gettempdir(),
        sys.prefix,
        sys.base_prefix,
        os.getcwd(),
        str(Path.home()),
        str(Path(__file__).resolve().parents[1]),
    ):
        roots.setdefault(other, "<server>/")
        roots.setdefault(str(Path(other).resolve()), "<server>/")
    roots = {root.rstrip("/"): shown for root, shown in roots.items() if root.rstrip("/")}
    alternatives = "|".join(re.escape(root) for root in sorted(roots, key=len, reverse=True))
    return re.compile(rf"({alternatives})(?:(/)|(?![\w.@+-]))"), roots
