"""The /ui dashboard in headless Chromium (Debian's, driven by Playwright) against the running service:
start a job from the page, watch it finish, see its loss curve, generate side by side. Screenshots are
kept under test-artifacts/ (or $BONE_TEST_ARTIFACTS)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.worker.recipes import MEMORIZE_RECIPE, MEMORIZE_RECORDS

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("BONE_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
# The closed network refuses Chromium's background connections; these flags keep it from trying.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 1600})
        yield page
        browser.close()


def test_start_job_watch_curve_and_generate_from_the_page(service, page, tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in MEMORIZE_RECORDS))
    training = MEMORIZE_RECIPE["training"]

    page.goto(service.url + "/ui/")
    page.wait_for_selector("#health.ready", timeout=30_000)
    page.fill("input[name=adapter_name]", "from-ui")
    page.set_input_files("input[name=file]", str(data))
    page.fill("input[name=r]", str(MEMORIZE_RECIPE["bone"]["r"]))
    page.fill("input[name=max_steps]", str(training["max_steps"]))
    page.fill("input[name=learning_rate]", str(training["learning_rate"]))
    page.fill("input[name=batch_size]", str(training["batch_size"]))
    page.click("#job-form button[type=submit]")
    page.wait_for_selector("#job-form-result:has-text('started job-')", timeout=15_000)

    page.wait_for_selector("#jobs-body td.status-succeeded", timeout=240_000)
    # the chart of the selected (new) job has one point per step
    page.wait_for_function("Number(document.getElementById('loss-chart').dataset.trainPoints) >= "
                           f"{training['max_steps']}", timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "dashboard-job-finished.png"), full_page=True)

    page.wait_for_selector("#adapter-left option[value='from-ui']", state="attached", timeout=15_000)
    record = MEMORIZE_RECORDS[0]
    page.fill("#prompt", record["prompt"])
    page.select_option("#adapter-left", "from-ui")
    page.select_option("#adapter-right", "")
    page.fill("#max-new-tokens", str(len(record["completion"].encode())))
    page.click("#generate")
    page.wait_for_function("document.getElementById('output-left').textContent !== '…' && "
                           "document.getElementById('output-right').textContent !== '…'", timeout=60_000)
    left = page.text_content("#output-left")
    right = page.text_content("#output-right")
    page.screenshot(path=str(ARTIFACTS / "dashboard-playground.png"), full_page=True)
    assert left == record["completion"]
    assert right != record["completion"]
