"""Hetzner's and Tailscale's APIs for the cluster's default stack (make demo
STACK=default), emulated on loopback for as long as the cluster runs.

    python -m tests.support.clouds --build build/cluster   # Cluster.up(hosted=True) starts it

Emulated: Hetzner Cloud's API (tests/support/hetzner_api.py), whose servers
are real exit-node VMs booting the user_data the hcloud provider sent, on the
cluster's topology (tests/support/exit_vm.py), and Tailscale's API over the
cluster's Headscale (tests/support/tailscale_api.py), holding the tailnet
policy the README asks for. Their endpoints and credentials go to
`<build>/clouds.json` (mode 0600) once both answer; on SIGTERM every VM is
killed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.datapath.stack_tailnet import stack_policy_for_headscale
from tests.datapath.topology import Topology, cache_bin_dir
from tests.support.exit_vm import BootingHooks, BootNet, VmBooter
from tests.support.headscale import HeadscaleCLI
from tests.support.hetzner_api import HetznerAPI
from tests.support.tailscale_api import KEY_OWNER, TailscaleAPI, api_call

CLOUDS_FILE = "clouds.json"


@dataclass(frozen=True)
class Clouds:
    """What a stack needs to use the emulated clouds (secrets: hcloud_token, tailscale_api_key)."""

    hcloud_endpoint: str
    hcloud_token: str
    tailscale_base_url: str
    tailscale_api_key: str

    @classmethod
    def load(cls, build: Path) -> Clouds:
        return cls(**json.loads((build / CLOUDS_FILE).read_text()))

    def stack_config(self) -> dict[str, str]:
        """The stack's provider keys: credentials (set as secrets) and endpoints."""
        return {
            "hcloud:token": self.hcloud_token,
            "hcloud:endpoint": self.hcloud_endpoint,
            "tailscale:apiKey": self.tailscale_api_key,
            "tailscale:baseUrl": self.tailscale_base_url,
        }


SECRET_KEYS = ("hcloud:token", "tailscale:apiKey")


def serve(build: Path, run_id: str) -> None:
    topo = Topology(build / "topology", cache_bin_dir(), run_id=run_id, attach=True)
    booter = VmBooter(BootNet(topo))
    hooks = BootingHooks(booter.make)
    token = secrets.token_hex(32)  # 64 characters, as the provider requires
    headscale = HeadscaleCLI(topo.bin / "headscale", topo.hs_config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        with (
            HetznerAPI({token: "read_write"}, hooks=hooks).running() as hetzner,
            TailscaleAPI(headscale).running() as tailnet,
        ):
            # The user's tailnet: the policy the README asks for, owned by the API's user.
            headscale.user_id(KEY_OWNER)
            policy = stack_policy_for_headscale(auto_approve=False, owner=f"{KEY_OWNER}@")
            status, _, answer = api_call(tailnet, "POST", "/tailnet/-/acl", policy)
            if status != 200:
                raise RuntimeError(f"the tailnet policy was refused: {answer}")
            clouds = Clouds(hetzner.endpoint, token, tailnet.base_url, tailnet.api_key)
            path = build / CLOUDS_FILE
            tmp = path.with_suffix(".tmp")
            tmp.touch(mode=0o600)
            tmp.write_text(json.dumps(asdict(clouds)))
            tmp.replace(path)
            print("ready", flush=True)
            stop.wait()
    finally:
        booter.close()
        (build / CLOUDS_FILE).unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", type=Path, required=True, help="the cluster's build directory")
    p.add_argument("--run-id", required=True, help="the cluster topology's run id")
    args = p.parse_args(argv)
    os.umask(0o077)
    serve(args.build, args.run_id)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
