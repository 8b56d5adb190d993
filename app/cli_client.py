"""Client commands of ``bone-server`` (jobs, adapters, generate) that talk to a running API over HTTP.

``--url`` / ``BONE_URL`` pick the server, ``--api-key`` / ``BONE_API_KEY`` the key (default on a loopback URL: the
local admin key in the data dir). Errors print as one line and exit non-zero.
"""

from __future__ import annotations

import functools
import io
import time
from urllib.parse import urlsplit
from pathlib import Path
from typing import Optional
import zipfile

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from app.client import ApiError, BoneClient
from core.auth import is_loopback
from core.local_key import read_local_key
from core.settings import Settings

console = Console()
err_console = Console(stderr=True)

UrlOption = typer.Option("http://127.0.0.1:8000", "--url", envvar="BONE_URL", help="API base URL")
KeyOption = typer.Option(None, "--api-key", envvar="BONE_API_KEY", help="API key (Bearer)")

jobs_cli = typer.Typer(help="Fine-tuning jobs.", no_args_is_help=True)
adapters_cli = typer.Typer(help="The adapter registry.", no_args_is_help=True)


def _client(url: str, api_key: str | None) -> BoneClient:
    """A client with the given key; with none, a loopback server's local admin key from the data dir (what
    ``bone-server up`` mints when no BONE_API_KEYS are set), so local use needs no copying of keys."""
    if api_key is None and is_loopback(urlsplit(url).hostname or ""):
        try:
            api_key = read_local_key(Settings().data_dir)
        except ValueError:  # unreadable BONE_* settings: go without; the server answers 401 if it needs a key
            api_key = None
    return BoneClient(url, api_key)


def one_line_errors(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ApiError as exc:
            err_console.print(f"bone-server: {exc}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(code=1) from None
    return wrapper


@jobs_cli.command("create")
@one_line_errors
def jobs_create(file: Path = typer.Option(..., "--file", exists=True, dir_okay=False,
                                          help="training data: JSONL, JSON, CSV or Parquet"),
                name: str = typer.Option(..., "--name", help="adapter name"),
                r: int = typer.Option(8, help="Bone rank"),
                bat: bool = typer.Option(False, help="train the Bat variant"),
                max_steps: Optional[int] = typer.Option(None), epochs: Optional[float] = typer.Option(None),
                learning_rate: Optional[float] = typer.Option(None), batch_size: Optional[int] = typer.Option(None),
                overwrite: bool = typer.Option(False), url: str = UrlOption, api_key: Optional[str] = KeyOption) -> None:
    """Upload FILE (validated row by row by the server), then start fine-tuning NAME on it."""
    training = {k: v for k, v in {"max_steps": max_steps, "epochs": epochs, "learning_rate": learning_rate,
                                  "batch_size": batch_size}.items() if v is not None}
    client = _client(url, api_key)
    uploaded = client.upload_file(file)
    body = {"adapter_name": name, "dataset": {"file_id": uploaded["id"]},
            "bone": {"r": r, "init_weights": "bat" if bat else True}, "training": training, "overwrite": overwrite}
    job = client.create_job(body)
    console.print(f"{job['id']}  {job['status']}  adapter={job['adapter_name']}  file={uploaded['id']}")


@jobs_cli.command("list")
@one_line_errors
def jobs_list(limit: int = 20, url: str = UrlOption, api_key: Optional[str] = KeyOption) -> None:
    table = Table("id", "adapter", "status", "step", "loss", "error")
    for job in _client(url, api_key).list_jobs(limit):
        progress = job.get("progress") or {}
        loss = (job.get("metrics") or {}).get("train_loss")
        table.add_row(job["id"], job["adapter_name"], job["status"],
                      f"{progress.get('step', 0)}/{progress.get('total_steps') or '?'}",
                      "" if loss is None else f"{loss:.4f}", (job.get("error") or "")[:60])
    console.print(table)


@jobs_cli.command("watch")
@one_line_errors
def jobs_watch(job_id: str, interval: float = 0.5, url: str = UrlOption, api_key: Optional[str] = KeyOption) -> None:
    """Follow a job with a live progress bar (step, loss, ETA) until it ends; exit 1 unless it succeeded."""
    client = _client(url, api_key)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(job_id, total=None, loss="-")
        while True:
            job = client.get_job(job_id)
            progress = job.get("progress") or {}
            loss = (job.get("metrics") or {}).get("train_loss")
            bar.update(task, total=progress.get("total_steps"), completed=progress.get("step", 0),
                       description=f"{job_id} {job['status']}", loss="-" if loss is None else f"{loss:.4f}")
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(interval)
    console.print(f"{job_id}: {job['status']}" + (f" — {job['error']}" if job.get("error") else ""))
    if job["status"] != "succeeded":
        raise typer.Exit(code=1)


@jobs_cli.command("cancel")
@one_line_errors
def jobs_cancel(job_id: str, url: str = UrlOption, api_key: Optional[str] = KeyOption) -> None:
    job = _client(url, api_key).cancel_job(job_id)
    console.print(f"{job['id']}: {job['status']}")


@adapters_cli.command("list")
@one_line_errors
def adapters_list(url: str = UrlOption, api_key: Optional[str] = KeyOption) -> None:
    table = Table("name", "base model", "r", "variant", "train loss", "size", "created")
    for info in _client(url, api_key).list_adapters():
        bone = info.get("bone") or {}
        loss = (info.get("metrics") or {}).get("train_loss")
        table.add_row(info["name"], info["base_model"], str(bone.get("r")),
                      "bat" if bone.get("init_weights") == "bat" else "bone",
                      "" if loss is None else f"{loss:.4f}", f"{info['size_bytes'] / 1024:.0f} KiB",
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(info["created_at"])))
    console.print(table)


@adapters_cli.command("download")
@one_line_errors
def adapters_download(name: str, directory: Path, format: str = typer.Option("bone", help="bone | miss | lora"),
                      url: str = UrlOption, api_key: Optional[str] = KeyOption) -> None:
    """Write adapter NAME into DIRECTORY in PEFT's layout (as trained, as MiSS, or as a LoRA adapter)."""
    data = _client(url, api_key).download_adapter(name, format)
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        archive.extractall(directory)
    console.print(f"{name} → {directory} ({format})")


@adapters_cli.command("import")
@one_line_errors
def adapters_import(directory: Path = typer.Argument(..., exists=True, file_okay=False),
                    name: Optional[str] = typer.Option(None, help="registry name (default: the folder's name)"),
                    overwrite: bool = False, url: str = UrlOption, api_key: Optional[str] = KeyOption) -> None:
    """Import a PEFT Bone / MiSS adapter folder; the server checks it against its base model first."""
    info = _client(url, api_key).import_adapter(name or directory.name, directory, overwrite)
    console.print(f"imported {info['name']} (sha256 {info['sha256'][:12]}…)")


def generate(prompt: str = typer.Argument(...), adapter: Optional[str] = typer.Option(None, help="adapter name (default: base model)"),
             max_new_tokens: int = 64, temperature: float = 0.0, stream: bool = typer.Option(True),
             url: str = UrlOption, api_key: Optional[str] = KeyOption) -> None:
    """Generate from the base model or an adapter, streaming to the terminal."""
    client = _client(url, api_key)
    params = {"max_new_tokens": max_new_tokens, "temperature": temperature}
    try:
        if stream:
            for event, payload in client.generate_stream(prompt, adapter, **params):
                if event == "message" and payload.get("text"):  # the final "done" event repeats the whole text
                    console.out(payload["text"], end="", highlight=False)
            console.out("")
        else:
            console.out(client.generate(prompt, adapter, **params)["text"], highlight=False)
    except ApiError as exc:
        err_console.print(f"bone-server: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None


def register(cli: typer.Typer) -> None:
    cli.add_typer(jobs_cli, name="jobs")
    cli.add_typer(adapters_cli, name="adapters")
    cli.command("generate")(generate)
