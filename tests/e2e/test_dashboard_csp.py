"""The dashboard works under its Content-Security-Policy: in headless Chromium, its script runs (the health
pill turns "ready"), its stylesheet applies, and the browser reports no CSP violation."""

from __future__ import annotations

import time

import pytest

from tests.e2e.test_dashboard import page  # noqa: F401 - the Chromium page fixture

pytestmark = pytest.mark.slow


def test_the_dashboard_runs_under_its_csp(service, page):  # noqa: F811
    messages: list[str] = []
    page.on("console", lambda message: messages.append(message.text))
    response = page.goto(service.url + "/ui/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    # Polled from here: wait_for_function would eval() a string in the page, which this very CSP forbids.
    deadline = time.monotonic() + 30
    while page.locator("#health").text_content() != "ready":
        assert time.monotonic() < deadline, f"app.js did not run: {messages}"
        time.sleep(0.2)
    assert page.locator("link[rel=stylesheet]").count() == 1
    assert page.evaluate("() => document.styleSheets[0].cssRules.length") > 0  # style.css loaded and applied
    violations = [m for m in messages if "Content Security Policy" in m]
    assert violations == [], violations
