"""A real Headscale on loopback, and its command line (issue 18).

The engine suite's control server: the emulated Tailscale API
(`tests/support/tailscale_api.py`) keeps its keys, devices, routes and policy
here, and a tailscaled on this machine can join it at `server_url`. The data
path and the cluster run their own Headscale inside their network topology
(`tests/datapath/topology.py`); this one needs no network namespace.

The policy lives in Headscale's database (`policy.mode: database`), so that
`headscale policy set` is the one way to change it, as the Tailscale API's
POST /acl is for a tailnet.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.apiserver import bin_dir, free_ports

BASE_DOMAIN = "tailnet.test"


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class HeadscaleError(Exception):
    """A headscale command failed; the message is Headscale's own."""


def headscale_config(state: Path, listen_port: int, metrics_port: int, grpc_port: int) -> dict[str, Any]:
    """Headscale on 127.0.0.1 without TLS, its DERP map a loopback region that
    nothing serves: joining and the API need no relay."""
    (state / "derp.yaml").write_text(
        yaml.safe_dump(
            {
                "regions": {
                    900: {
                        "regionid": 900,
                        "regioncode": "lo",
                        "regionname": "loopback (unused)",
                        "nodes": [
                            {"name": "900a", "regionid": 900, "hostname": "127.0.0.1", "stunport": -1, "derpport": 1}
                        ],
                    }
                }
            }
        )
    )
    return {
        "server_url": f"http://127.0.0.1:{listen_port}",
        "listen_addr": f"127.0.0.1:{listen_port}",
        "metrics_listen_addr": f"127.0.0.1:{metrics_port}",
        "grpc_listen_addr": f"127.0.0.1:{grpc_port}",
        "noise": {"private_key_path": str(state / "noise_private.key")},
        "prefixes": {"v4": "100.64.0.0/10", "v6": "fd7a:115c:a1e0::/48", "allocation": "sequential"},
        "derp": {"server": {"enabled": False}, "urls": [], "paths": [str(state / "derp.yaml")]},
        "disable_check_updates": True,
        "database": {"type": "sqlite", "sqlite": {"path": str(state / "db.sqlite"), "write_ahead_log": True}},
        "policy": {"mode": "database"},
        "dns": {"magic_dns": True, "base_domain": BASE_DOMAIN, "override_local_dns": False},
        "unix_socket": str(state / "headscale.sock"),
        "unix_socket_permission": "0770",
        "logtail": {"enabled": False},
    }


@dataclass
class HeadscaleCLI:
    """Headscale's command line against a running server (its unix socket,
    named in the config): this module's own Headscale or a topology's."""

    binary: Path
    config_path: Path

    def cli(self, *args: str) -> Any:
        """Run `headscale <args> -o json`: its JSON answer (None when empty),
        or HeadscaleError with Headscale's message."""
        out = self.text(*args, "-o", "json")
        try:
            answer = json.loads(out) if out else None
        except json.JSONDecodeError:
            return out
        return answer

    def text(self, *args: str) -> str:
        """Run `headscale <args>`: what it printed, or HeadscaleError with
        Headscale's message."""
        done = subprocess.run(
            [str(self.binary), "-c", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        out = done.stdout.strip()
        if done.returncode != 0:
            said = out or done.stderr.strip()
            try:
                message = json.loads(said).get("error", said)
            except (json.JSONDecodeError, AttributeError):
                message = said
            raise HeadscaleError(str(message or f"exit {done.returncode}"))
        return out

    def user_id(self, name: str) -> int:
        """The id of user `name`, created when missing."""
        for user in self.cli("users", "list") or []:
            if user.get("name") == name:
                return int(user["id"])
        created = self.cli("users", "create", name)
        return int(created["id"])


class Headscale(HeadscaleCLI):
    """One Headscale process on loopback and its state directory."""

    def __init__(self, state: Path, binary: Path | None = None) -> None:
        super().__init__(binary or bin_dir() / "headscale", state / "config.yaml")
        self.state = state
        self.port, self._metrics_port, self._grpc_port = free_ports(3)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def server_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.state / "headscale.log"

    @contextmanager
    def running(self) -> Iterator[Headscale]:
        if not self.binary.exists():
            raise RuntimeError(f"headscale not built ({self.binary}): build it with `make datapath-bins`")
        self.state.mkdir(parents=True, exist_ok=True)
        config = headscale_config(self.state, self.port, self._metrics_port, self._grpc_port)
        self.config_path.write_text(yaml.safe_dump(config))
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [str(self.binary), "-c", str(self.config_path), "serve"], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            self._wait_until_serving()
            yield self
        finally:
            stop(self._process)
            self._process = None

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"headscale exited:\n{self.log.read_text()[-3000:]}")
            try:
                self.cli("users", "list")
                return
            except HeadscaleError:
                time.sleep(0.2)
        raise RuntimeError(f"headscale did not answer within 30 s:\n{self.log.read_text()[-3000:]}")


@contextmanager
def joined_node(login_server: str, state: Path, auth_key: str, hostname: str, *up_args: str) -> Iterator[Path]:
    """A real tailscaled (userspace networking, no root needed) joined to
    the control server at `login_server` with `auth_key` as `hostname`; yields its socket. Raises
    HeadscaleError with tailscale's message when the join is refused."""
    state.mkdir(parents=True, exist_ok=True)
    socket_path = state / "tailscaled.sock"
    with (state / "tailscaled.log").open("ab") as log:
        daemon = subprocess.Popen(
            [
                str(bin_dir() / "tailscaled"),
                "--tun=userspace-networking",
                f"--statedir={state}",
                f"--socket={socket_path}",
                "--port=0",
                "--no-logs-no-support",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while not socket_path.exists() and time.monotonic() < deadline and daemon.poll() is None:
            time.sleep(0.1)
        up = subprocess.run(
            [
                str(bin_dir() / "tailscale"),
                f"--socket={socket_path}",
                "up",
                f"--login-server={login_server}",
                f"--auth-key={auth_key}",
                f"--hostname={hostname}",
                "--timeout=30s",
                *up_args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if up.returncode != 0:
            raise HeadscaleError(f"tailscale up as {hostname}: {(up.stderr or up.stdout).strip()}")
        yield socket_path
    finally:
        stop(daemon)
