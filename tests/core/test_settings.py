import pytest
from pydantic import ValidationError

from core.settings import Settings, describe_validation_error


def test_environment_prefix_and_derived_dirs(monkeypatch, tmp_path):
    monkeypatch.setenv("BONE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("BONE_PORT", "9001")
    settings = Settings()
    assert settings.port == 9001
    assert settings.registry_dir == tmp_path / "adapters"


@pytest.mark.parametrize(
    "name,value", [("BONE_PORT", "abc"), ("BONE_PORT", "70000"), ("BONE_REDIS_URL", "http://x"), ("BONE_DEVICE", "tpu")]
)
def test_bad_setting_is_named_in_one_line(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    line = describe_validation_error(info.value)
    assert name in line and "\n" not in line


def test_co_training_settings_and_the_owner_share_default(monkeypatch, tmp_path):
    monkeypatch.setenv("BONE_DATA_DIR", str(tmp_path))
    assert (Settings().cotrain_max_jobs, Settings().cotrain_owner_seats) == (8, 4)
    monkeypatch.setenv("BONE_COTRAIN_MAX_JOBS", "5")
    assert Settings().cotrain_owner_seats == 3  # half, rounded up
    monkeypatch.setenv("BONE_COTRAIN_OWNER_SHARE", "9")
    assert Settings().cotrain_owner_seats == 5  # never above the group
    monkeypatch.setenv("BONE_COTRAIN_MAX_JOBS", "1")
    assert Settings().cotrain_owner_seats == 1  # co-training off
    for name, value in (
        ("BONE_COTRAIN_MAX_JOBS", "0"),
        ("BONE_COTRAIN_MAX_JOBS", "65"),
        ("BONE_COTRAIN_OWNER_SHARE", "0"),
    ):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValidationError) as info:
            Settings()
        assert name in describe_validation_error(info.value)
        monkeypatch.setenv(name, "2")
