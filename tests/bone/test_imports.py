"""bone's config loads without torch, so the API's request model can derive from it in a process that never
imports torch for it. (The arrows between packages and the absence of import cycles are import-linter's
contracts in pyproject.toml, run by `make lint`.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_config_loads_without_torch():
    code = "import sys, bone.config, core.jobs; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={"PYTHONPATH": str(ROOT)})
