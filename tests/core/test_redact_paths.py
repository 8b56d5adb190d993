"""Messages that leave the server name files relative to the data dir and hide every other server path."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

from core.paths import redact_server_paths

DATA = Path("/srv/bone-data")


@pytest.mark.parametrize(
    "message, shown",
    [
        (
            "dataset file 'x.jsonl' does not exist in /srv/bone-data/datasets",
            "dataset file 'x.jsonl' does not exist in datasets",
        ),
        (
            "cannot read /srv/bone-data/adapters/a/adapter_model.safetensors",
            "cannot read adapters/a/adapter_model.safetensors",
        ),
        ("path must stay inside /srv/bone-data", "path must stay inside <data dir>"),
        (
            f"staging at {tempfile.gettempdir()}/tmpab12/upload.safetensors",
            "staging at <server>/tmpab12/upload.safetensors",
        ),
        (
            f"no module in {sys.prefix}/lib/python3/site-packages/x.py",
            "no module in <server>/lib/python3/site-packages/x.py",
        ),
        ("no route POST /jobs/x", "no route POST /jobs/x"),  # not a server path: left alone
        ("plain text", "plain text"),
        ("/srv/bone-data-other/x", "/srv/bone-data-other/x"),  # a sibling of the data dir is not inside it
    ],
)
def test_server_paths_are_redacted(message, shown):
    assert redact_server_paths(message, DATA) == shown
