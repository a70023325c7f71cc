"""A throwaway S3-protocol server for the tests: moto's standalone server, in a process of its own.

hpcckpt talks to it with the real client (s3fs over HTTP), through a small TCP relay, also a process of its
own (``tests/workers/tcprelay.py``). The relay is the fault edge: ``cut()`` kills it with SIGKILL in the middle of a
transfer (the client sees its connection reset and the endpoint refuse new ones, as when a server dies), and
``resume()`` starts it again on the same port. The server behind it keeps what it stored, as a real object
store does across a restart; moto keeps its objects in memory only, so killing moto itself would also erase
every bucket, which no real outage does.

Clients find it through the standard environment (``env()``): ``AWS_ENDPOINT_URL``, the keys and the region,
which botocore (under s3fs) reads by itself. The server accepts any key pair; ``wrong_env()`` gives keys it
refuses, for the wrong-credentials tests. moto authenticates requests only after its first
``INITIAL_NO_AUTH_ACTION_COUNT``: the lab spends those on making an IAM user allowed everything on S3 and its
key pair (``access_key``, ``secret_key``: the secret the tests look for in logs and files), and every request
after them is checked against it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import free_port
from paths import TCP_RELAY

REGION = "us-east-1"
START_TIMEOUT = 120.0  # moto imports boto3 and flask: tens of seconds on a loaded 2-core machine


def _wait_until_listening(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} before listening on port {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {START_TIMEOUT:.0f} s")


class S3Lab:
    """moto's S3 server and the relay in front of it. ``endpoint`` is the relay's URL: the one clients use."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.server_port = free_port()
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server: subprocess.Popen[bytes] | None = None
        self._relay: subprocess.Popen[bytes] | None = None
        self._buckets = 0
        self.access_key = self.secret_key = ""

    def start(self) -> S3Lab:
        environ = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_ACTIONS)}
        with open(self.log_dir / "moto.log", "ab") as log:
            self._server = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.server_port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environ,
                start_new_session=True,
            )
        _wait_until_listening(self.server_port, self._server, "moto's S3 server")
        self.access_key, self.secret_key = _make_user(f"http://127.0.0.1:{self.server_port}")
        self.resume()
        return self

    def resume(self) -> None:
        """Start the relay (again), on the same port."""
        with open(self.log_dir / "relay.log", "ab") as log:
            self._relay = subprocess.Popen(
                [sys.executable, str(TCP_RELAY), str(self.port), str(self.server_port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_until_listening(self.port, self._relay, "the S3 relay")

    @property
    def relay_up(self) -> bool:
        return self._relay is not None and self._relay.poll() is None

    def cut(self) -> None:
        """Kill the relay (SIGKILL): transfers in progress break, new connections are refused."""
        relay, self._relay = self._relay, None
        if relay is not None and relay.poll() is None:
            relay.send_signal(signal.SIGKILL)
            relay.wait()

    def stop(self) -> None:
        self.cut()
        server, self._server = self._server, None
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGKILL)
            server.wait()

    def env(self) -> dict[str, str]:
        """What a client process needs in its environment to reach the server (botocore's own variables)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            # No shared config or credentials file of the machine's user may take part.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def wrong_env(self) -> dict[str, str]:
        """Like ``env()``, with a secret key the server refuses."""
        return {**self.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}

    def new_bucket(self, prefix: str = "hpcckpt") -> str:
        """Create a fresh bucket (through the server directly) and return its name."""
        self._buckets += 1
        name = f"{prefix}-{os.getpid()}-{self._buckets}"
        client = _client("s3", f"http://127.0.0.1:{self.server_port}", self.access_key, self.secret_key)
        try:
            client.create_bucket(Bucket=name)
        finally:
            client.close()
        return name


_SETUP_ACTIONS = 3  # create_user, put_user_policy, create_access_key
_ALLOW_S3 = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'


def _client(service: str, endpoint: str, access_key: str = "unused", secret_key: str = "unused") -> Any:
    import botocore.session

    session = botocore.session.get_session()
    session.set_credentials(access_key, secret_key)
    return session.create_client(service, region_name=REGION, endpoint_url=endpoint)


def _make_user(endpoint: str) -> tuple[str, str]:
    """An IAM user allowed everything on S3, and its key pair: the server's first, unauthenticated actions."""
    iam = _client("iam", endpoint)
    try:
        iam.create_user(UserName="hpcckpt-tests")
        iam.put_user_policy(UserName="hpcckpt-tests", PolicyName="s3", PolicyDocument=_ALLOW_S3)
        key = iam.create_access_key(UserName="hpcckpt-tests")["AccessKey"]
    finally:
        iam.close()
    return str(key["AccessKeyId"]), str(key["SecretAccessKey"])
