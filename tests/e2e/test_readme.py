"""The README's walkthrough, executed: every ```bash block of its "Walkthrough" section runs, in order, in one
bash against a live service (real api + worker, auth on with the minted local admin key, as `make run` has
it), and the ```text block under a bash block must match what that block printed.

Matching: each line of a text block must occur in the block's output, in order; whitespace is ignored (so
`{"a": 1}` matches the server's `{"a":1}`) and `…` stands for anything."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def walkthrough_steps(text: str) -> list[tuple[str, str | None]]:
    """(bash, expected or None) for every bash block of the Walkthrough section, in order."""
    section = text.split("\n## Walkthrough\n", 1)[1].split("\n## ", 1)[0]
    steps: list[tuple[str, str | None]] = []
    for lang, body in FENCE.findall(section):
        if lang == "bash":
            steps.append((body, None))
        elif lang == "text" and steps and steps[-1][1] is None:
            steps[-1] = (steps[-1][0], body)
    return steps


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def missing_lines(expected: str, output: str) -> list[str]:
    """The expected lines not found in the output (in order, whitespace ignored, … = anything)."""
    haystack, position, missing = _squash(output), 0, []
    for line in filter(None, (ln.strip() for ln in expected.splitlines())):
        pattern = ".*?".join(re.escape(part) for part in _squash(line).split("…"))
        found = re.compile(pattern).search(haystack, position)
        if found is None:
            missing.append(line)
        else:
            position = found.end()
    return missing


@pytest.mark.parametrize(
    "expected, output, ok",
    [
        ('{"text": " Paris."}', '{"text":" Paris."}', True),
        ("job-…: succeeded", "job-abc: succeeded — loss", True),
        ("a\nb", "b a", False),  # in order
        ('"text": " Rome."', '"text":" Paris."', False),
    ],
)
def test_the_matcher_can_fail(expected, output, ok):
    assert (missing_lines(expected, output) == []) is ok


def test_the_walkthrough_has_steps_and_checks():
    steps = walkthrough_steps(README.read_text())
    assert len(steps) >= 8 and sum(expected is not None for _, expected in steps) >= 8


def test_the_readme_walkthrough_runs_as_written(keyed_service, tmp_path):
    svc = keyed_service
    steps = walkthrough_steps(README.read_text())
    script = [
        "set -euo pipefail",
        # `bone-server` is this checkout's CLI, run by the suite's interpreter
        f'bone-server() {{ "{sys.executable}" -m cli "$@"; }}',
    ]
    for index, (bash, _) in enumerate(steps):
        bash = bash.replace("http://127.0.0.1:8000", svc.url).replace("bone-data/", f"{svc.data_dir}/")
        script += [f"echo; echo '@@step {index}@@'", bash]
    # The CLI finds the server through BONE_PORT and the key through BONE_DATA_DIR, as after `make run`.
    env = {
        **os.environ,
        "BONE_PORT": str(svc.port),
        "BONE_DATA_DIR": str(svc.data_dir),
        "COLUMNS": "200",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("BONE_URL", None)
    env.pop("BONE_API_KEY", None)
    workdir = tmp_path / "checkout"  # files a step writes (job.json) land here, not in the repository
    workdir.mkdir()
    (workdir / "examples").symlink_to(ROOT / "examples")
    run = subprocess.run(
        ["bash", "-c", "\n".join(script)], capture_output=True, text=True, env=env, cwd=workdir, timeout=900
    )
    outputs = re.split(r"^@@step \d+@@\n", run.stdout + "\n", flags=re.M)[1:]
    assert run.returncode == 0, (
        f"step {len(outputs) - 1} failed:\n{steps[len(outputs) - 1][0]}\n--- stdout\n"
        f"{run.stdout[-3000:]}\n--- stderr\n{run.stderr[-3000:]}\n{svc.logs()}"
    )
    assert len(outputs) == len(steps)
    for (bash, expected), output in zip(steps, outputs):
        if expected is not None:
            assert missing_lines(expected, output) == [], f"{bash}\n--- printed\n{output}"
