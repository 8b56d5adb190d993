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
