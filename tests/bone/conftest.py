import pytest

from tests.bone.tiny import GOLDEN_DIR


@pytest.fixture
def golden_dir():
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden vectors not found at {GOLDEN_DIR} (the shared/ folder beside the repo root)")
    return GOLDEN_DIR.resolve()
