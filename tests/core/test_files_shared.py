"""The file store in the registry's store (a real folder registry): two machines' data dirs see the same files;
a reader's copy is checked against the sidecar's sha256; deletes reach every machine."""

from __future__ import annotations

import io

import pytest

from core.errors import NotFound
from core.files import FILES_DIR, FileStore
from core.settings import Settings

ROWS = b'{"text": "a"}\n{"text": "b"}\n'


def machines(tmp_path):
    url = f"file://{tmp_path / 'registry'}"
    one = Settings(data_dir=tmp_path / "one", registry_url=url)
    two = Settings(data_dir=tmp_path / "two", registry_url=url)
    return FileStore.from_settings(one), FileStore.from_settings(two), tmp_path / "registry" / FILES_DIR


def test_a_file_saved_on_one_machine_is_listed_read_and_deleted_on_another(tmp_path):
    api, worker, shared = machines(tmp_path)
    info = api.save(io.BytesIO(ROWS), "t.jsonl", max_bytes=1000, owner="alice")
    api.save(io.BytesIO(ROWS), "u.jsonl", max_bytes=1000, owner="bob")
    assert sorted(p.name for p in shared.iterdir()) == sorted(
        [
            f"{info.id}.jsonl",
            f"{info.id}.meta.json",
            *(f"{f.id}{s}" for f in api.list("bob") for s in (".jsonl", ".meta.json")),
        ]
    )
    assert [f.id for f in worker.list("alice")] == [info.id]  # what the per-owner quota sums
    assert sum(f.bytes for f in worker.list("alice")) == len(ROWS)
    local = worker.path(info.id)
    assert local.read_bytes() == ROWS and local.is_relative_to(tmp_path / "two")

    worker.delete(info.id)
    assert not local.exists() and not (shared / f"{info.id}.jsonl").exists()
    with pytest.raises(NotFound):
        api.get(info.id)
    assert [f.owner for f in api.list()] == ["bob"]


def test_a_copy_that_does_not_match_the_sidecar_is_refused(tmp_path):
    api, worker, shared = machines(tmp_path)
    info = api.save(io.BytesIO(ROWS), "t.jsonl", max_bytes=1000)
    (shared / f"{info.id}.jsonl").write_bytes(ROWS.replace(b"a", b"z"))  # same size, other bytes
    with pytest.raises(NotFound, match="sha256"):
        worker.path(info.id)
    assert not (tmp_path / "two" / "files" / ".cache" / f"{info.id}.jsonl").exists()


def test_without_a_registry_url_files_stay_in_the_data_dir(tmp_path):
    store = FileStore.from_settings(Settings(data_dir=tmp_path / "one"))
    info = store.save(io.BytesIO(ROWS), "t.jsonl", max_bytes=1000)
    assert store.shared is None
    assert store.path(info.id) == tmp_path / "one" / "files" / f"{info.id}.jsonl"
