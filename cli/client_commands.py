"""Client commands of ``bone-server`` (files, jobs, adapters, evals, generate) that talk to a running API.

The server is found as the server itself finds its address: ``--url`` / ``BONE_URL``, else
``http://BONE_HOST:BONE_PORT`` (default http://127.0.0.1:8000). The key is ``--api-key`` / ``BONE_API_KEY``, else,
on a loopback URL, the local admin key the server minted into ``BONE_DATA_DIR`` (default ./bone-data). When the
server asks for a key and none was found, the error says where the client looked and how to pass one.
Errors print as one line and exit non-zero.
"""

from __future__ import annotations

import functools
import io
import json
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cli.http_client import ApiError, BoneClient
from core.auth import is_loopback
from core.local_key import local_key_path, read_local_key
from core.names import BASE_ADAPTER
from core.vllm_export import serve_command, sync_folder, unzip

console = Console()
err_console = Console(stderr=True)
FINAL = ("succeeded", "failed", "cancelled")

UrlOption = typer.Option(
    None,
    "--url",
    envvar="BONE_URL",
    show_default=False,
    help="API base URL (default: http://$BONE_HOST:$BONE_PORT, i.e. http://127.0.0.1:8000)",
)
KeyOption = typer.Option(
    None,
    "--api-key",
    envvar="BONE_API_KEY",
    show_default=False,
    help="API key (Bearer) (default: $BONE_DATA_DIR/local-admin.key on a loopback URL)",
)

files_cli = typer.Typer(help="Training and evaluation datasets uploaded to the server.", no_args_is_help=True)
jobs_cli = typer.Typer(help="Fine-tuning jobs.", no_args_is_help=True)
adapters_cli = typer.Typer(help="The adapter registry.", no_args_is_help=True)
evals_cli = typer.Typer(help="Evaluations of adapters (and the base model) on held-out rows.", no_args_is_help=True)


# --- where the server is, which key -------------------------------------------------------------------------
def _server_setting(name: str, default: str) -> str:
    """A BONE_* setting as the server reads it (environment, then the .env file it would read)."""
    try:
        from core.settings import Settings

        return str(getattr(Settings(), name))
    except Exception:  # noqa: BLE001 - an unrelated bad BONE_* value must not stop the client
        return os.environ.get(f"BONE_{name.upper()}", default)


def default_url() -> str:
    host = _server_setting("host", "127.0.0.1")
    if host in ("0.0.0.0", "::", ""):  # the server listens everywhere: talk to it on this machine
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{_server_setting('port', '8000')}"


@dataclass
class Target:
    url: str
    api_key: str | None
    looked: str  # where the key came from, or where the client looked for one


def resolve_target(url: str | None, api_key: str | None) -> Target:
    url = url or default_url()
    if api_key:
        return Target(url, api_key, "--api-key / BONE_API_KEY")
    if not is_loopback(urlsplit(url).hostname or ""):
        return Target(
            url,
            None,
            f"--api-key and BONE_API_KEY (not set; {url} is not loopback, so the local admin key is not used)",
        )
    data_dir = Path(_server_setting("data_dir", "bone-data"))
    key_file = local_key_path(data_dir).resolve()
    key = read_local_key(data_dir)
    if key:
        return Target(url, key, str(key_file))
    return Target(
        url,
        None,
        f"--api-key, BONE_API_KEY (not set) and {key_file} (not found; BONE_DATA_DIR is the "
        "folder the server uses, ./bone-data from where you ran `make run`)",
    )


class Session:
    """One command's client, which turns a 401 into a message that says how to pass a key."""

    def __init__(self, url: str | None, api_key: str | None) -> None:
        self.target = resolve_target(url, api_key)
        self.client = BoneClient(self.target.url, self.target.api_key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def _client(url: str | None, api_key: str | None) -> Session:
    return Session(url, api_key)


def one_line_errors(func):
    """ApiError → one line on stderr and exit 1; a 401 also says where the key was looked for."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ApiError as exc:
            message = f"bone-server: {exc}"
            if exc.status == 401:
                target = resolve_target(kwargs.get("url"), kwargs.get("api_key"))
                if target.api_key is None:
                    message = (
                        f"bone-server: missing API key: looked in {target.looked}. Pass one with --api-key KEY "
                        "or export BONE_API_KEY=KEY (or set BONE_DATA_DIR to the server's data folder)"
                    )
                else:
                    message += f" - the key from {target.looked} was refused"
            err_console.print(message, markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(code=1) from None

    return wrapper


def _when(timestamp: float | None) -> str:
    return "" if not timestamp else time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def _loss(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _print_json(data: Any) -> None:
    console.print_json(json.dumps(data))


# --- files --------------------------------------------------------------------------------------------------
@files_cli.command("upload")
@one_line_errors
def files_upload(
    file: Path = typer.Argument(
        ..., exists=True, dir_okay=False, help="JSONL, JSON, CSV or Parquet: text, prompt/completion or messages rows"
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only the file id"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
) -> None:
    """Upload a dataset; the server validates it row by row before keeping it, and prints its id."""
    info = _client(url, api_key).upload_file(file)
    console.print(
        info["id"] if quiet else f"{info['id']}  {info['rows']} rows  format={info['format']}  {file.name}",
        markup=False,
        highlight=False,
    )


@files_cli.command("list")
@one_line_errors
def files_list(
    limit: int = typer.Option(20, help="newest first, at most this many"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
) -> None:
    """List uploaded files, newest first."""
    table = Table("id", "filename", "rows", "format", "size", "created")
    # GET /files answers the whole list, newest first (it takes no parameters): the limit is applied here.
    for info in _client(url, api_key).request("GET", "/files")["data"][:limit]:
        table.add_row(
            info["id"],
            info["filename"],
            str(info["rows"]),
            info["format"],
            f"{info['bytes'] / 1024:.1f} KiB",
            _when(info.get("created_at")),
        )
    console.print(table)


@files_cli.command("delete")
@one_line_errors
def files_delete(
    file_id: str = typer.Argument(..., help="file-… id, as `files list` shows"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
) -> None:
    """Delete an uploaded file (jobs that already read it keep their results)."""
    _client(url, api_key).request("DELETE", f"/files/{file_id}")
    console.print(f"deleted {file_id}", markup=False, highlight=False)


# --- jobs ---------------------------------------------------------------------------------------------------
@jobs_cli.command("create")
@one_line_errors
def jobs_create(
    file: Path = typer.Option(
        ..., "--file", exists=True, dir_okay=False, help="training data: JSONL, JSON, CSV or Parquet (uploaded first)"
    ),
    name: str = typer.Option(..., "--name", help="adapter name: lowercase letters, digits, . _ - (at most 64)"),
    r: int = typer.Option(8, help="Bone rank (block size)"),
    bat: bool = typer.Option(False, help="train the Bat variant instead of Bone"),
    target_modules: str | None = typer.Option(
        None, help="comma separated module names, or all-linear (default: the model type's usual ones)"
    ),
    max_steps: int | None = typer.Option(None, help="optimizer steps; overrides --epochs"),
    epochs: float | None = typer.Option(None, help="passes over the data (server default: 3)"),
    learning_rate: float | None = typer.Option(None, help="peak learning rate (server default: 2e-4)"),
    batch_size: int | None = typer.Option(None, help="rows per micro-batch (server default: 4)"),
    overwrite: bool = typer.Option(False, help="replace an adapter of the same name when done"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only the job id"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
) -> None:
    """Upload FILE (validated row by row by the server), then start fine-tuning adapter NAME on it."""
    training = {
        k: v
        for k, v in {
            "max_steps": max_steps,
            "epochs": epochs,
            "learning_rate": learning_rate,
            "batch_size": batch_size,
        }.items()
        if v is not None
    }
    bone: dict[str, Any] = {"r": r, "init_weights": "bat" if bat else True}
    if target_modules:
        bone["target_modules"] = target_modules if target_modules == "all-linear" else target_modules.split(",")
    client = _client(url, api_key)
    uploaded = client.upload_file(file)
    job = client.create_job(
        {
            "adapter_name": name,
            "dataset": {"file_id": uploaded["id"]},
            "bone": bone,
            "training": training,
            "overwrite": overwrite,
        }
    )
    console.print(
        job["id"]
        if quiet
        else f"{job['id']}  {job['status']}  adapter={job['adapter_name']}  "
        f"file={uploaded['id']}\n  follow it: bone-server jobs watch {job['id']}",
        markup=False,
        highlight=False,
    )


@jobs_cli.command("list")
@one_line_errors
def jobs_list(
    limit: int = typer.Option(20, help="newest first, at most this many"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
) -> None:
    """List jobs, newest first: status, progress, last loss, error."""
    table = Table("id", "adapter", "status", "step", "loss", "error")
    for job in _client(url, api_key).list_jobs(limit):
        progress = job.get("progress") or {}
        table.add_row(
            job["id"],
            job["adapter_name"],
            job["status"],
            f"{progress.get('step', 0)}/{progress.get('total_steps') or '?'}",
            _loss((job.get("metrics") or {}).get("train_loss")),
            (job.get("error") or "")[:60],
        )
    console.print(table)


@jobs_cli.command("show")
@one_line_errors
def jobs_show(
    job_id: str = typer.Argument(..., help="job-… id"), url: str | None = UrlOption, api_key: str | None = KeyOption
) -> None:
    """Print one job as JSON: settings, status, progress, metrics, error."""
    _print_json(_client(url, api_key).get_job(job_id))


@jobs_cli.command("watch")
@one_line_errors
def jobs_watch(
    job_id: str = typer.Argument(..., help="job-… id"),
    interval: float = typer.Option(0.5, help="seconds between polls"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
) -> None:
    """Follow a job with a live progress bar (step, loss, ETA) until it ends; exit 1 unless it succeeded."""
    client = _client(url, api_key)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(job_id, total=None, loss="-")
        while True:
            job = client.get_job(job_id)
            progress = job.get("progress") or {}
            loss = (job.get("metrics") or {}).get("train_loss")
            bar.update(
                task,
                total=progress.get("total_steps"),
                completed=progress.get("step", 0),
                description=f"{job_id} {job['status']}",
                loss=_loss(loss) or "-",
            )
            if job["status"] in FINAL:
                break
            time.sleep(interval)
    metrics = job.get("metrics") or {}
    summary = (
        (
            f" — loss {_loss(metrics.get('train_loss_first'))} → {_loss(metrics.get('train_loss'))}, "
            f"adapter {job['adapter_name']} published"
        )
        if job["status"] == "succeeded"
        else ""
    )
    console.print(
        f"{job_id}: {job['status']}{summary}" + (f" — {job['error']}" if job.get("error") else ""),
        markup=False,
        highlight=False,
    )
    if job["status"] != "succeeded":
        raise typer.Exit(code=1)


@jobs_cli.command("cancel")
@one_line_errors
def jobs_cancel(
    job_id: str = typer.Argument(..., help="job-… id"), url: str | None = UrlOption, api_key: str | None = KeyOption
) -> None:
    """Cancel a job and say what happened: a queued job never runs; a running one stops at its next step
    and publishes nothing; a finished one is left as it is."""
    client = _client(url, api_key)
    job = client.get_job(job_id)
    if job["status"] not in FINAL:
        try:
            job = client.cancel_job(job_id)
        except ApiError as exc:
            if exc.status != 409:  # 409: it ended between the two calls; say how, below
                raise
            job = client.get_job(job_id)
        if job["status"] == "cancelled":
            console.print(f"{job_id}: cancelled before it ran; nothing was published", markup=False, highlight=False)
        else:
            console.print(
                f"{job_id}: cancel requested; the worker stops it at its next step and publishes nothing "
                f"(bone-server jobs watch {job_id})",
                markup=False,
                highlight=False,
            )
        return
    console.print(f"{job_id}: job already {job['status']}; nothing to cancel", markup=False, highlight=False)


# --- adapters -----------------------------------------------------------------------------------------------
@adapters_cli.command("list")
@one_line_errors
def adapters_list(url: str | None = UrlOption, api_key: str | None = KeyOption) -> None:
    """List the registry's adapters: base model, rank, variant, last train loss, size."""
    table = Table("name", "base model", "r", "variant", "train loss", "size", "created")
    for info in _client(url, api_key).list_adapters():
        bone = info.get("bone") or {}
        table.add_row(
            info["name"],
            info["base_model"],
            str(bone.get("r")),
            "bat" if bone.get("init_weights") == "bat" else "bone",
            _loss((info.get("metrics") or {}).get("train_loss")),
            f"{info['size_bytes'] / 1024:.0f} KiB",
            _when(info.get("created_at")),
        )
    console.print(table)


@adapters_cli.command("show")
@one_line_errors
def adapters_show(
    name: str = typer.Argument(..., help="adapter name"), url: str | None = UrlOption, api_key: str | None = KeyOption
) -> None:
    """Print one adapter's metadata as JSON (config, metrics, lineage, latest evaluation)."""
    _print_json(_client(url, api_key).request("GET", f"/adapters/{name}"))


@adapters_cli.command("delete")
@one_line_errors
def adapters_delete(
    name: str = typer.Argument(..., help="adapter name"), url: str | None = UrlOption, api_key: str | None = KeyOption
) -> None:
    """Delete an adapter from the registry; the server stops serving it at once."""
    _client(url, api_key).request("DELETE", f"/adapters/{name}")
    console.print(f"deleted {name}", markup=False, highlight=False)


@adapters_cli.command("compose")
@one_line_errors
def adapters_compose(
    name: str = typer.Argument(..., help="name of the new adapter"),
    parts: list[str] = typer.Argument(..., metavar="ADAPTER=WEIGHT...", help="e.g. greeter=0.7 other=0.3"),
    overwrite: bool = typer.Option(False, help="replace an adapter of the same name"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
) -> None:
    """Store the exact weighted sum of Bone adapters (same base model, same r) as adapter NAME."""
    weights: dict[str, float] = {}
    for part in parts:
        source, sep, weight = part.partition("=")
        try:
            weights[source] = float(weight) if sep else 1.0
        except ValueError:
            raise typer.BadParameter(f"{part!r}: expected ADAPTER=WEIGHT, e.g. greeter=0.5") from None
    info = _client(url, api_key).request(
        "POST", f"/adapters/{name}/compose", json={"adapters": weights, "overwrite": overwrite}
    )
    console.print(
        f"composed {info['name']} = " + " + ".join(f"{w:g}·{a}" for a, w in weights.items()),
        markup=False,
        highlight=False,
    )


def _write_adapter(name: str, directory: Path, fmt: str, url: str | None, api_key: str | None) -> None:
    data = _client(url, api_key).download_adapter(name, fmt)
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        archive.extractall(directory)
    console.print(f"{name} → {directory} ({fmt})", markup=False, highlight=False)


@adapters_cli.command("download")
@one_line_errors
def adapters_download(
    name: str = typer.Argument(..., help="adapter name"),
    directory: Path = typer.Argument(..., help="folder to write into (created if missing)"),
    format: str = typer.Option("bone", help="bone (as trained) | miss (current PEFT) | lora"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
) -> None:
    """Write adapter NAME into DIRECTORY in PEFT's layout (as trained, as MiSS, or as a LoRA adapter)."""
    _write_adapter(name, directory, format, url, api_key)


@adapters_cli.command("export")
@one_line_errors
def adapters_export(
    name: str = typer.Argument(..., help="adapter name"),
    directory: Path = typer.Argument(..., help="folder to write into (created if missing)"),
    format: str = typer.Option("lora", help="lora (vLLM, LoRAX, PEFT) | miss | bone"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
) -> None:
    """Export adapter NAME for other servers: an exact LoRA by default (Bone's update has rank r)."""
    _write_adapter(name, directory, format, url, api_key)


@adapters_cli.command("export-vllm")
@one_line_errors
def adapters_export_vllm(
    directory: Path = typer.Argument(..., help="folder to write: one sub-folder per adapter"),
    base_model: str | None = typer.Option(
        None,
        help="the name vLLM serves the base model under (written as "
        "base_model_name_or_path; default: what a LoRA download writes)",
    ),
    prune: bool = typer.Option(
        True, help="remove folders of adapters no longer listed (only folders this command wrote)"
    ),
    watch: float = typer.Option(0, help="keep syncing every this many seconds (0: once)"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
) -> None:
    """Write every adapter you can see as its exact LoRA adapter in the layout vLLM reads, and print the
    `vllm serve` line for them. Unchanged adapters are not downloaded again."""
    client = _client(url, api_key)

    def fetch(name: str) -> dict[str, bytes]:
        return unzip(client.download_adapter(name, "lora"))

    first = True
    while True:
        listing = {a["name"]: a["sha256"] for a in client.list_adapters()}
        result = sync_folder(directory, listing, fetch, base_model=base_model, prune=prune)
        for name, why in result.failed.items():
            err_console.print(f"skipped {name}: {why}", markup=False, highlight=False)
        console.print(
            f"{directory}: {len(result.written)} written, {len(result.unchanged)} unchanged, "
            f"{len(result.removed)} removed, {len(result.failed)} skipped",
            markup=False,
            highlight=False,
        )
        if first or result.written or result.removed:
            served = base_model or _exported_base(directory, result.adapters) or "BASE_MODEL"
            console.print(
                f"serve them with vLLM:\n  {serve_command(served, result)}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        if not watch:
            break
        first = False
        time.sleep(watch)


def _exported_base(directory: Path, names: list[str]) -> str | None:
    for name in names:
        return json.loads((directory / name / "adapter_config.json").read_text()).get("base_model_name_or_path")
    return None


@adapters_cli.command("import")
@one_line_errors
def adapters_import(
    directory: Path = typer.Argument(..., exists=True, file_okay=False, help="a PEFT Bone / MiSS adapter folder"),
    name: str | None = typer.Option(None, help="registry name (default: the folder's name)"),
    overwrite: bool = typer.Option(False, help="replace an adapter of the same name"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
) -> None:
    """Import a PEFT Bone / MiSS adapter folder; the server checks it against its base model first."""
    info = _client(url, api_key).import_adapter(name or directory.name, directory, overwrite)
    console.print(f"imported {info['name']} (sha256 {info['sha256'][:12]}…)", markup=False, highlight=False)


# --- evaluations --------------------------------------------------------------------------------------------
def _eval_table(evaluation: dict[str, Any]) -> Table:
    table = Table("model", "loss", "perplexity", "token accuracy", "exact match", "examples")
    for model, m in (evaluation.get("results") or {}).items():
        exact = "" if m.get("exact_match") is None else f"{m['exact_match']:.2f} of {m['exact_match_examples']}"
        table.add_row(
            "base model" if model == BASE_ADAPTER else model,
            _loss(m.get("loss")),
            "" if m.get("perplexity") is None else f"{m['perplexity']:.2f}",
            "" if m.get("token_accuracy") is None else f"{m['token_accuracy']:.3f}",
            exact,
            str(m.get("examples", "")),
        )
    return table


@evals_cli.command("create")
@one_line_errors
def evals_create(
    adapters: list[str] = typer.Argument(..., help="adapter names to score together"),
    file: Path = typer.Option(
        ..., "--file", exists=True, dir_okay=False, help="held-out rows (uploaded first), same formats as training"
    ),
    include_base: bool = typer.Option(True, help="also score the base model on the same rows"),
    max_new_tokens: int = typer.Option(64, help="greedy tokens for exact match; 0 skips it"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only the evaluation id"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
) -> None:
    """Score ADAPTERS (and the base model) on FILE on a worker: loss, perplexity, token accuracy, exact match."""
    client = _client(url, api_key)
    uploaded = client.upload_file(file)
    evaluation = client.request(
        "POST",
        "/evals",
        json={
            "adapters": adapters,
            "include_base": include_base,
            "dataset": {"file_id": uploaded["id"]},
            "max_new_tokens": max_new_tokens,
        },
    )
    console.print(
        evaluation["id"]
        if quiet
        else f"{evaluation['id']}  {evaluation['status']}  "
        f"file={uploaded['id']}\n  follow it: bone-server evals watch {evaluation['id']}",
        markup=False,
        highlight=False,
    )


@evals_cli.command("show")
@one_line_errors
def evals_show(
    eval_id: str = typer.Argument(..., help="eval-… id"), url: str | None = UrlOption, api_key: str | None = KeyOption
) -> None:
    """Show an evaluation's status and its results, one row per adapter and the base model."""
    evaluation = _client(url, api_key).request("GET", f"/evals/{eval_id}")
    console.print(
        f"{eval_id}: {evaluation['status']}" + (f" — {evaluation['error']}" if evaluation.get("error") else ""),
        markup=False,
        highlight=False,
    )
    if evaluation.get("results"):
        console.print(_eval_table(evaluation))


@evals_cli.command("watch")
@one_line_errors
def evals_watch(
    eval_id: str = typer.Argument(..., help="eval-… id"),
    interval: float = typer.Option(0.5, help="seconds between polls"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
) -> None:
    """Wait for an evaluation to end, then show its results; exit 1 unless it succeeded."""
    client = _client(url, api_key)
    with console.status(f"{eval_id} …"):
        while (evaluation := client.request("GET", f"/evals/{eval_id}"))["status"] not in FINAL:
            time.sleep(interval)
    console.print(
        f"{eval_id}: {evaluation['status']}" + (f" — {evaluation['error']}" if evaluation.get("error") else ""),
        markup=False,
        highlight=False,
    )
    if evaluation.get("results"):
        console.print(_eval_table(evaluation))
    if evaluation["status"] != "succeeded":
        raise typer.Exit(code=1)


# --- generation ---------------------------------------------------------------------------------------------
@one_line_errors
def generate(
    prompt: str = typer.Argument(..., help="the text to continue; in bash write newlines as $'Q: …?\\nA:'"),
    adapter: str | None = typer.Option(None, help="adapter name (default: the base model)"),
    max_new_tokens: int = typer.Option(64, help="at most this many new tokens"),
    temperature: float = typer.Option(0.0, help="0 = greedy (the same answer every time)"),
    stream: bool = typer.Option(True, help="print tokens as they come"),
    url: str | None = UrlOption,
    api_key: str | None = KeyOption,
) -> None:
    """Generate from the base model or an adapter, streaming to the terminal."""
    client = _client(url, api_key)
    params = {"max_new_tokens": max_new_tokens, "temperature": temperature}
    if stream:
        for event, payload in client.generate_stream(prompt, adapter, **params):
            if event == "message" and payload.get("text"):  # the final "done" event repeats the whole text
                console.out(payload["text"], end="", highlight=False)
        console.out("")
    else:
        console.out(client.generate(prompt, adapter, **params)["text"], highlight=False)


def register(cli: typer.Typer) -> None:
    cli.add_typer(files_cli, name="files")
    cli.add_typer(jobs_cli, name="jobs")
    cli.add_typer(adapters_cli, name="adapters")
    cli.add_typer(evals_cli, name="evals")
    cli.command("generate")(generate)
