"""Where the adapter registry keeps its files: a local directory, or any fsspec URL (``s3://bucket/prefix``).

Both backends answer the same few questions for ``core.registry`` (which owns names, metadata, sha256 checks
and errors); they differ only in how a publish is made atomic:

* ``LocalStorage`` (``local.py``): the files and ``metadata.json`` go into a hidden staging folder, are
  fsynced, then the folder is renamed into place (one atomic rename on one filesystem).
* ``ObjectStorage`` (``objects.py``): object stores have no rename, so each publish writes a new *version*
  folder and then, last, ``<name>/manifest.json``; readers see only names whose manifest exists.

``common.py`` holds what both share. Tunables (``LISTING_SETTLED_S``, ``ORPHAN_GRACE_S``) are read from the
backend module that uses them, so patch them there, not here.
"""

from core.storage.common import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE, Check, MayReplace, fsync_path
from core.storage.local import PUBLISH_LOCK_FILE, LocalStorage
from core.storage.objects import MANIFEST_FILE, ObjectStorage, new_version

__all__ = [
    "CONFIG_FILE",
    "MANIFEST_FILE",
    "METADATA_FILE",
    "PUBLISH_LOCK_FILE",
    "WEIGHTS_FILE",
    "Check",
    "LocalStorage",
    "MayReplace",
    "ObjectStorage",
    "fsync_path",
    "new_version",
]
