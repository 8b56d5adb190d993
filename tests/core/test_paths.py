"""The one rule for paths that come from requests (core/paths.py): datasets stay in the datasets folder, base
models in the allowed model dirs, nothing resolves against the working directory, and a refusal reads the same
whether or not something exists at the path (no file-existence oracle)."""

from __future__ import annotations

import os

import pytest

from core.base_model import resolve_base_model
from core.errors import InvalidRequest
from core.paths import dataset_file, dataset_source, is_hub_id

SUFFIXES = (".jsonl", ".csv", ".parquet", ".json")


@pytest.fixture
def datasets(tmp_path):
    root = tmp_path / "data" / "datasets"
    (root / "mine").mkdir(parents=True)
    (root / "mine" / "train.jsonl").write_text('{"text": "a"}\n')
    (root / "rows.jsonl").write_text('{"text": "a"}\n')
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "train.jsonl").write_text('{"text": "alice"}\n')
    (root / "escape").symlink_to(outside, target_is_directory=True)
    return root


def test_hf_dataset_is_a_folder_inside_the_datasets_dir(datasets):
    assert dataset_source("mine", datasets_dir=datasets, allow_hub=False, param="p") == str(datasets / "mine")


@pytest.mark.parametrize(
    "name",
    [
        "files",
        "data/files",
        "../secret",
        "/etc",
        "~/x",
        "escape",
        "escape/train.jsonl",
        "nobody/nothing",
        "mine/../../secret",
        "a\\b",
    ],
)
def test_every_other_hf_dataset_name_is_refused_with_one_message(datasets, name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # "data/..." exists relative to the working directory: must not matter
    with pytest.raises(InvalidRequest) as refused:
        dataset_source(name, datasets_dir=datasets, allow_hub=False, param="dataset.hf_dataset")
    assert refused.value.param == "dataset.hf_dataset" and refused.value.code == "dataset_not_allowed"
    assert (
        refused.value.message == f"hf_dataset {name!r} is not available: name a dataset folder inside the data "
        "dir's datasets folder, relative to it (hub datasets are off: BONE_ALLOW_HUB_DATASETS)"
    )
    assert str(tmp_path) not in refused.value.message  # no server path in the answer


def test_hub_datasets_only_when_allowed_and_never_a_working_directory_path(datasets, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert dataset_source("nobody/nothing", datasets_dir=datasets, allow_hub=True, param="p") == "nobody/nothing"
    # "data/datasets" names a folder under the working directory, which load_dataset would read first
    with pytest.raises(InvalidRequest, match="is not available"):
        dataset_source("data/datasets", datasets_dir=datasets, allow_hub=True, param="p")
    assert not is_hub_id("data/datasets") and not is_hub_id("a/../b") and is_hub_id("Qwen/Qwen2.5-0.5B")


@pytest.mark.parametrize(
    # the last: longer than a file name may be (ENAMETOOLONG, which pathlib's is_file raises; found by the fuzzer)
    "name",
    ["missing.jsonl", "../secret/train.jsonl", "escape/train.jsonl", "/etc/passwd", "mine", "n" * 300 + ".jsonl"],
)
def test_dataset_paths_outside_or_missing_read_the_same(datasets, name):
    with pytest.raises(InvalidRequest) as refused:
        dataset_file(name, datasets_dir=datasets, suffixes=SUFFIXES, param="dataset.path")
    assert (
        refused.value.message == f"dataset path {name!r} is not available: name a file inside the data dir's "
        "datasets folder, relative to it"
    )
    assert dataset_file("rows.jsonl", datasets_dir=datasets, suffixes=SUFFIXES, param="p") == datasets / "rows.jsonl"


def test_row11_base_model_traversal_and_missing_path_read_the_same(settings, tmp_path, monkeypatch):
    """Row 11: ``data/../../../etc/passwd`` and a missing path used to get two different messages."""
    monkeypatch.chdir(tmp_path)
    messages = set()
    for name in (
        "data/../../../etc/passwd",
        "data/../../../no/such/file",
        "/etc",
        "/no/such/dir",
        str(settings.data_dir / "missing-model"),
        "../x",
        "./x",
        "~/x",
    ):
        with pytest.raises(InvalidRequest) as refused:
            resolve_base_model(name, settings)
        assert refused.value.code == "base_model_not_allowed" and refused.value.param == "base_model"
        messages.add(refused.value.message.replace(repr(name), "NAME"))
    assert len(messages) == 1


def test_base_model_symlink_out_of_the_allowed_dirs_is_refused(settings, tmp_path):
    outside = tmp_path / "outside-model"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    link = settings.data_dir / "linked-model"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidRequest, match="is not available"):
        resolve_base_model(str(link), settings)
    inside = settings.data_dir / "inside-model"
    inside.mkdir()
    (inside / "config.json").write_text("{}")
    assert resolve_base_model(str(inside), settings) == str(inside.resolve())


def test_a_hub_id_shadowed_by_the_working_directory_is_refused(settings, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs(tmp_path / "org" / "model")
    (tmp_path / "org" / "model" / "config.json").write_text("{}")
    with pytest.raises(InvalidRequest, match="is not available"):
        resolve_base_model("org/model", settings)
    assert resolve_base_model("org/other", settings) == "org/other"


# --- one hf_dataset rule for the API's request model and the worker ---------------------------------------------
@pytest.mark.parametrize("name", ["../x", "a/../b", "a/b/c", "/etc", "a\\b", "~/x", "./x", "a\x00b", "-x", "./x/."])
def test_a_dataset_name_of_another_shape_is_refused_alike_by_the_request_and_the_worker(datasets, name):
    from pydantic import ValidationError

    from core.jobs import HFDataset

    with pytest.raises(ValidationError) as request:
        HFDataset(hf_dataset=name)
    assert "must be 'name' or 'namespace/name'" in str(request.value)
    (datasets / "x").mkdir()  # even where the name would lead to a folder inside the datasets dir
    with pytest.raises(InvalidRequest) as worker:
        dataset_source(name, datasets_dir=datasets, allow_hub=True, param="dataset.hf_dataset")
    assert worker.value.code == "dataset_not_allowed"


def test_a_stored_record_keeps_its_dataset_name_and_its_type():
    from core.jobs import STORED, BoneSpec, HFDataset, InlineRecords, Job, PathDataset, TrainingSpec

    fields = {"id": "job-1", "adapter_name": "a", "base_model": "b", "bone": BoneSpec(), "training": TrainingSpec()}
    old = Job.model_validate({**fields, "dataset": {"hf_dataset": "a/b/c", "split": "train"}}, context=STORED)
    assert isinstance(old.dataset, HFDataset) and old.dataset.hf_dataset == "a/b/c"
    job = Job.model_validate(
        {**fields, "dataset": {"path": "rows.jsonl"}, "validation_dataset": {"records": 3, "format": "text"}}
    )
    assert isinstance(job.dataset, PathDataset) and isinstance(job.validation_dataset, InlineRecords)
    shown = job.model_dump(mode="json")  # the summary the API shows: no null keys
    assert (shown["dataset"], shown["validation_dataset"]) == ({"path": "rows.jsonl"}, {"records": 3, "format": "text"})
    again = Job.model_validate_json(job.model_dump_json(), context=STORED)
    assert again.dataset == job.dataset and again.validation_dataset == job.validation_dataset
