"""The /ui dashboard in headless Chromium (Debian's, driven by Playwright) against the running service:
start a job from the page (uploading through /files), watch it finish, see its detail and loss curve,
generate side by side (streamed), evaluate; and the "enter your API key" state of a keyed server.
Screenshots are kept under test-artifacts/ (or $BONE_TEST_ARTIFACTS)."""

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
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1400})
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
    assert " on file-" in page.text_content("#job-form-result")  # uploaded through /files, not sent inline

    page.wait_for_selector("#jobs-body td.status-succeeded", timeout=240_000)
    # the chart of the selected (new) job has one point per step
    # Predicates are arrow functions: a bare expression string is eval()ed in the page, which the CSP forbids.
    page.wait_for_function(
        f"() => Number(document.getElementById('loss-chart').dataset.trainPoints) >= {training['max_steps']}",
        timeout=30_000,
    )
    # the job detail: settings, metrics, events; step ticks along the x-axis; no eval legend without evals
    page.wait_for_selector("#job-detail-status:has-text('succeeded')", timeout=30_000)
    assert "training.max_steps" in page.text_content("#job-settings")
    assert "train_loss" in page.text_content("#job-metrics")
    events = page.text_content("#job-events")
    assert "started" in events and "published adapter 'from-ui'" in events
    assert int(page.get_attribute("#loss-chart", "data-x-ticks")) >= 4
    assert page.is_hidden("#legend-eval")
    page.screenshot(path=str(ARTIFACTS / "dashboard-job-finished.png"), full_page=True)

    page.wait_for_selector("#adapter-left option[value='from-ui']", state="attached", timeout=15_000)
    record = MEMORIZE_RECORDS[0]
    page.fill("#prompt", record["prompt"])
    page.select_option("#adapter-left", "from-ui")
    page.select_option("#adapter-right", "")
    page.fill("#max-new-tokens", str(len(record["completion"].encode())))
    page.click("#generate")
    page.wait_for_selector("#output-left[data-state=done]", timeout=60_000)
    page.wait_for_selector("#output-right[data-state=done]", timeout=60_000)
    left = page.text_content("#output-left")
    right = page.text_content("#output-right")
    page.screenshot(path=str(ARTIFACTS / "dashboard-playground.png"), full_page=True)
    assert left == record["completion"]
    assert right != record["completion"]

    # evaluate the new adapter against the base model from the page: results per adapter
    page.select_option("#eval-adapters", ["from-ui"])
    page.set_input_files("#eval-form input[name=file]", str(data))
    page.click("#eval-form button[type=submit]")
    page.wait_for_selector("#evals-list .status-succeeded", timeout=120_000)
    page.wait_for_selector("#evals-list td:has-text('base model')", timeout=15_000)
    results = page.text_content("#evals-list")
    assert "from-ui" in results and f"1.00 of {len(MEMORIZE_RECORDS)}" in results
    page.screenshot(path=str(ARTIFACTS / "dashboard-eval.png"), full_page=True)


def test_a_keyed_server_asks_for_the_key_and_keeps_it_only_when_told(keyed_service, page):
    page.goto(keyed_service.url + "/ui/")
    page.wait_for_selector("#key-needed:not([hidden])", timeout=30_000)
    assert "Enter your API key" in page.text_content("#jobs-body")
    page.screenshot(path=str(ARTIFACTS / "dashboard-key-needed.png"), full_page=True)

    key = (keyed_service.data_dir / "local-admin.key").read_text().strip()
    page.fill("#api-key", key)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#key-needed", state="hidden", timeout=15_000)
    page.wait_for_selector("#jobs-body td.hint:has-text('No jobs yet')", timeout=15_000)
    assert page.evaluate("localStorage.getItem('bone-api-key')") is None  # not ticked: memory only

    page.check("#remember-key")
    assert page.evaluate("localStorage.getItem('bone-api-key')") == key
    page.uncheck("#remember-key")
    assert page.evaluate("localStorage.getItem('bone-api-key')") is None
