"""A small HTTP client for the bone-server API, used by the command-line client.

Errors come back as ``ApiError`` carrying the server's envelope message, so the CLI can print one line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        detail = f" (HTTP {status}{', field ' + param if param else ''})" if status else ""
        super().__init__(message + detail)
        self.status, self.message, self.param = status, message, param


class BoneClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    # --- plumbing -------------------------------------------------------------------------------------
    @staticmethod
    def _raise_for_error(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            error = response.json()["error"]
            raise ApiError(response.status_code, error.get("message", "error"), error.get("param"))
        except (ValueError, KeyError, TypeError):
            raise ApiError(response.status_code, response.text[:200] or response.reason_phrase) from None

    def request(self, method: str, path: str, **kwargs) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(0, f"cannot reach {self.http.base_url}: {exc}") from None
        self._raise_for_error(response)
        return response.json() if response.content else None

    def stream_sse(self, method: str, path: str, **kwargs) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ``(event name, JSON payload)`` per SSE event until the stream ends or sends [DONE]; an
        ``error`` event raises ApiError with the server's message."""
        try:
            with self.http.stream(
                method, path, headers={"Accept": "text/event-stream"}, timeout=None, **kwargs
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for_error(response)
                event = "message"
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data = line[5:].strip()
                        if data == "[DONE]":
                            return
                        payload = json.loads(data)
                        if event == "error":
                            error = payload.get("error", payload)
                            raise ApiError(500, error.get("message", "error"), error.get("param"))
                        yield event, payload
                    elif not line:
                        event = "message"  # a blank line ends an event
        except httpx.HTTPError as exc:
            raise ApiError(0, f"cannot reach {self.http.base_url}: {exc}") from None

    # --- the API --------------------------------------------------------------------------------------
    def upload_file(self, path) -> dict[str, Any]:
        with open(path, "rb") as handle:
            return self.request("POST", "/files", files={"file": (path.name, handle)})

    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/jobs", json=body)

    def list_jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        return self.request("GET", "/jobs", params={"limit": limit})["data"]

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/jobs/{job_id}/cancel")

    def list_adapters(self) -> list[dict[str, Any]]:
        adapters: list[dict[str, Any]] = []
        while True:  # the listing is paginated by name
            params = {"limit": 1000, **({"after": adapters[-1]["name"]} if adapters else {})}
            page = self.request("GET", "/adapters", params=params)
            adapters += page["data"]
            if not page.get("has_more") or not page["data"]:
                return adapters

    def download_adapter(self, name: str, fmt: str = "bone") -> bytes:
        try:
            response = self.http.get(f"/adapters/{name}/download", params={"format": fmt})
        except httpx.HTTPError as exc:
            raise ApiError(0, f"cannot reach {self.http.base_url}: {exc}") from None
        self._raise_for_error(response)
        return response.content

    def import_adapter(self, name: str, directory, overwrite: bool = False) -> dict[str, Any]:
        with (
            open(directory / "adapter_config.json", "rb") as config,
            open(directory / "adapter_model.safetensors", "rb") as weights,
        ):
            return self.request(
                "POST",
                "/adapters",
                data={"name": name, "overwrite": str(overwrite).lower()},
                files={
                    "adapter_config": ("adapter_config.json", config),
                    "adapter_model": ("adapter_model.safetensors", weights),
                },
            )

    def generate(self, prompt: str, adapter: str | None, **params) -> dict[str, Any]:
        return self.request("POST", "/generate", json={"prompt": prompt, "adapter": adapter, **params})

    def generate_stream(self, prompt: str, adapter: str | None, **params) -> Iterator[tuple[str, dict[str, Any]]]:
        return self.stream_sse(
            "POST", "/generate", json={"prompt": prompt, "adapter": adapter, "stream": True, **params}
        )
