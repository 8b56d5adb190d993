"""The ``bone-server`` command: ``up`` (API + worker + Redis), ``api``, ``worker``.

Flags override the ``BONE_*`` environment; settings are validated once here and a bad one stops start-up
with a single line naming it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import typer
from pydantic import ValidationError

from core.logs import setup_logging
from core.settings import Settings, describe_validation_error

cli = typer.Typer(
    no_args_is_help=True,
    help=(
        "Fine-tune and serve Bone adapters. `bone-server up` runs the service (API + worker + Redis if none answers); "
        "the other commands are clients of a running API (http://$BONE_HOST:$BONE_PORT, key from --api-key, "
        "BONE_API_KEY or the local admin key in $BONE_DATA_DIR)."
    ),
)
log = logging.getLogger("bone_server")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bone-server")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"bone-server {_version()}")
        raise typer.Exit()


@cli.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    """Fine-tune and serve Bone adapters."""


def _settings(**overrides) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        typer.echo(f"bone-server: {describe_validation_error(exc)}", err=True)
        raise typer.Exit(code=2) from None


def _setup_logging(settings: Settings) -> None:
    setup_logging(settings.log_level)
    # Every server process (and what it starts) creates files others cannot read: registry, uploads,
    # checkpoints, keys. Set here, before anything is written.
    os.umask(int(settings.umask, 8))


def _keyring(settings: Settings):
    """The API's keys; an API that would be open on a public address stops start-up with one line."""
    from core.auth import AuthConfigError, KeyRing

    try:
        return KeyRing.from_settings(settings)
    except AuthConfigError as exc:
        typer.echo(f"bone-server: {exc}", err=True)
        raise typer.Exit(code=2) from None


def _check_registry(settings: Settings) -> None:
    """An object-storage registry must write its manifests conditionally, or two publishers could both win:
    refuse to start otherwise, in one line. A store that does not answer now is only warned about (the API
    answers 503 for registry calls until it does)."""
    if not settings.registry_url:
        return
    from core.errors import ServiceUnavailable
    from core.registry import AdapterRegistry
    from core.storage.objects import StorageCapabilityError

    try:
        AdapterRegistry.from_settings(settings).check_storage()
    except StorageCapabilityError as exc:
        typer.echo(f"bone-server: {exc}", err=True)
        raise typer.Exit(code=2) from None
    except ServiceUnavailable as exc:
        log.warning("could not check the registry's conditional writes: %s", exc)


def _how_to_call(settings: Settings, keyring) -> str:
    url = f"http://{settings.host}:{settings.port}"
    auth = ' -H "Authorization: Bearer $BONE_API_KEY"' if keyring.enabled else ""
    if not keyring.enabled:
        state = "auth OFF (BONE_AUTH_DISABLED=true; allowed on loopback only)"
    elif keyring.local_key_file is not None:
        state = (
            f"API keys on: the local admin key is in {keyring.local_key_file} (set BONE_API_KEYS for your own "
            f"keys)\n  export BONE_API_KEY=$(cat {keyring.local_key_file})"
        )
    else:
        state = f"API keys on ({len(keyring)} configured)"
    return (
        f"bone-server: API on {url} - {state}\n"
        f"  curl {url}/generate{auth} -H 'Content-Type: application/json' "
        '-d \'{"prompt": "Hello", "max_new_tokens": 32}\'\n'
        f"  docs: {url}/docs   dashboard: {url}/ui (paste the key in its API key field)\n"
        f"  command line: bone-server --help (from a `make run` checkout: .venv/bin/bone-server, or "
        f"`source .venv/bin/activate` first)"
    )


def _serve_api(settings: Settings, worker_supervisor=None) -> None:
    import uvicorn

    from app.http_server import uvicorn_config
    from app.main import create_app

    app = create_app(settings)
    app.state.worker_supervisor = worker_supervisor  # /readyz reports the worker `up` keeps alive
    uvicorn.Server(uvicorn_config(app, settings)).run()


HOST_HELP = "bind address (default: $BONE_HOST, else 127.0.0.1)"
PORT_HELP = "port (default: $BONE_PORT, else 8000)"


@cli.command()
def api(
    host: str | None = typer.Option(None, help=HOST_HELP, show_default=False),
    port: int | None = typer.Option(None, help=PORT_HELP, show_default=False),
) -> None:
    """Run the HTTP API (needs a Redis at BONE_REDIS_URL)."""
    settings = _settings(host=host, port=port)
    keyring = _keyring(settings)
    _setup_logging(settings)
    _check_registry(settings)
    typer.echo(_how_to_call(settings, keyring), err=True)
    _serve_api(settings)


@cli.command()
def worker(
    burst: bool = typer.Option(False, help="exit when the queue is empty"),
    queues: str | None = typer.Option(
        None,
        show_default=False,
        help="queues to serve, comma separated, in priority order (e.g. gpu-24g,cpu) (default: $BONE_QUEUE_NAME)",
    ),
    device: str | None = typer.Option(
        None,
        show_default=False,
        help="cpu, cuda or cuda:N: the device this worker trains on (default: $BONE_DEVICE, else auto)",
    ),
) -> None:
    """Run one training worker (one per GPU with --device cuda:N, or one per machine for multi-GPU jobs)."""
    settings = _settings(device=device)
    _setup_logging(settings)
    _check_registry(settings)
    from core.fleet import DeviceUnavailable
    from worker.main import run_worker

    names = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    try:
        run_worker(settings, burst=burst, queues=names)
    except DeviceUnavailable as exc:
        typer.echo(f"bone-server: {exc}", err=True)
        raise typer.Exit(code=2) from None


@cli.command()
def up(
    host: str | None = typer.Option(None, help=HOST_HELP, show_default=False),
    port: int | None = typer.Option(None, help=PORT_HELP, show_default=False),
) -> None:
    """API + one worker, on the Redis at BONE_REDIS_URL, or on a private redis-server started here."""
    from cli.redis_launcher import ensure_redis
    from cli.worker_supervisor import WorkerSupervisor

    settings = _settings(host=host, port=port)
    keyring = _keyring(settings)
    _setup_logging(settings)
    _check_registry(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        redis_handle = ensure_redis(settings.redis_url, settings.data_dir)
    except RuntimeError as exc:
        typer.echo(f"bone-server: {exc}", err=True)
        raise typer.Exit(code=2) from None
    settings = settings.model_copy(update={"redis_url": redis_handle.url})
    child_env = {**os.environ, "BONE_REDIS_URL": redis_handle.url, "BONE_DATA_DIR": str(settings.data_dir)}
    # Restarted with backoff whenever it exits (crash, OOM kill, kill -9); /readyz reports it.
    supervisor = WorkerSupervisor(
        [sys.executable, "-m", "cli", "worker"], child_env, max_backoff_s=settings.reconnect_max_backoff_s
    ).start()
    # uvicorn re-raises the SIGTERM it caught once it has shut down; with the default handler that kills this
    # process on the spot and orphans the worker. Turn it into SystemExit so the cleanup below runs.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    log.info("worker started (pid %d); API on http://%s:%d", supervisor.pid, settings.host, settings.port)
    typer.echo(_how_to_call(settings, keyring), err=True)
    try:
        _serve_api(settings, supervisor)
    finally:
        supervisor.stop()
        redis_handle.stop()


keys_cli = typer.Typer(help="API keys.", no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")


@keys_cli.command("create")
def keys_create(
    owner: str = typer.Option(..., help="who the key belongs to (jobs, files and adapters are theirs)"),
    role: str = typer.Option("user", help="user (own resources only) or admin (everything)"),
) -> None:
    """Mint an API key: prints the key once (it is never stored) and the BONE_API_KEYS entry to add."""
    from core.keys import KeyEntry, generate_key, hash_key, parse_key_entry

    key = generate_key()
    try:
        entry = parse_key_entry(KeyEntry(owner=owner, role=role, sha256=hash_key(key)).line())  # type: ignore[arg-type]
    except ValueError as exc:
        typer.echo(f"bone-server: {exc}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(key)
    typer.echo(
        f"# Shown once, never stored. Add this entry to BONE_API_KEYS (comma separated) and restart the API:\n"
        f"# BONE_API_KEYS={entry.line()}",
        err=True,
    )


models_cli = typer.Typer(help="Base models.", no_args_is_help=True)
cli.add_typer(models_cli, name="models")


@models_cli.command("export-embedded")
def models_export_embedded(directory: str = typer.Argument(..., help="folder to write (new, or empty)")) -> None:
    """Write the embedded base model as a normal Hugging Face folder (config, weights, tokenizer), so adapters
    downloaded from a server on the embedded base load with PEFT / transformers / vLLM elsewhere: their
    base_model_name_or_path is "embedded-llama-v1", so export into that folder name next to them."""
    from pathlib import Path

    from core.base_model import build_embedded_model

    target = Path(directory).expanduser()
    if target.exists() and not target.is_dir():
        typer.echo(f"bone-server: {target} exists and is not a folder", err=True)
        raise typer.Exit(code=2)
    if target.is_dir() and any(target.iterdir()) and not (target / "config.json").is_file():
        typer.echo(f"bone-server: {target} is not empty; give a new or empty folder", err=True)
        raise typer.Exit(code=2)
    if (target / "config.json").is_file():
        typer.echo(f"bone-server: {target} already holds a model; nothing written", err=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        target.rmdir()  # empty: the build renames its staging folder into place
    build_embedded_model(target.resolve())
    typer.echo(str(target.resolve()))


from cli.client_commands import register as _register_client_commands  # noqa: E402 - after the server commands

_register_client_commands(cli)


def _exit_on_signal(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    cli()
