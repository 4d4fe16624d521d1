"""The relay is Ready only while its exit node can carry traffic.

The rendered readiness command is run with `sh`, as the kubelet runs it, with
a stand-in `tailscale` CLI that prints a status document shaped like
`tailscale status --json` (ipnstate.Status, two-space indents, fields in Go's
order). The data-path suite runs the same command against real tailscaled;
this suite covers the states that are hard to hold still there, such as
`ExitNodeStatus.Online` lagging behind the peer's own `Online`.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devtools.mockstack import Evaluation
from tests.stacks import dev, pinned
from tests.support.kube import applied_objects

OTHER_PEER_IP = "100.64.0.9"


@dataclass(frozen=True)
class Probe:
    command: list[str]
    exit_node_ip: str


def rendered_probe(evaluation: Evaluation) -> Probe:
    """The relay's readiness command, and the exit node the stack points it at."""
    (deployment,) = [d for d in applied_objects(evaluation) if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return Probe(container["readinessProbe"]["exec"]["command"], evaluation.outputs["exitNodeTailnetIp"])


def peer(hostname: str, ip: str, *, online: bool, exit_node: bool, option: bool) -> dict[str, Any]:
    """An ipnstate.PeerStatus in Go's field order (the subset that matters,
    with neighbours on both sides so no field of interest is last)."""
    return {
        "ID": f"n{hostname}",
        "PublicKey": f"nodekey:{hostname}",
        "HostName": hostname,
        "DNSName": f"{hostname}.tailnet.example.",
        "OS": "linux",
        "UserID": 1,
        "TailscaleIPs": [ip, "fd7a:115c:a1e0::1"],
        "AllowedIPs": [f"{ip}/32", "0.0.0.0/0", "::/0"] if option else [f"{ip}/32"],
        "Tags": ["tag:egress-exit"],
        "Addrs": None,
        "CurAddr": "",
        "Relay": "fsn",
        "RxBytes": 0,
        "TxBytes": 0,
        "Created": "2026-11-25T00:00:00Z",
        "LastSeen": "0001-01-01T00:00:00Z",
        "Online": online,
        "ExitNode": exit_node,
        "ExitNodeOption": option,
        "Active": False,
        "PeerAPIURL": [f"http://{ip}:12345"],
        "InNetworkMap": True,
        "InMagicSock": True,
        "InEngine": True,
    }


def status(
    exit_ip: str,
    *,
    backend: str = "Running",
    peers: list[dict[str, Any]],
    exit_node_status_online: bool | None = True,
) -> dict[str, Any]:
    """An ipnstate.Status: the relay itself, its peers, a user, and
    `ExitNodeStatus` (present while an exit node is selected and known)."""
    doc: dict[str, Any] = {
        "Version": "1.102.5",
        "TUN": False,
        "BackendState": backend,
        "HaveNodeKey": True,
        "AuthURL": "",
        "TailscaleIPs": ["100.64.0.2"],
        "Self": {
            "ID": "nrelay",
            "HostName": "relay",
            "TailscaleIPs": ["100.64.0.2"],
            "Online": True,
            "ExitNode": False,
            "ExitNodeOption": False,
            "CapMap": {"https://tailscale.com/cap/is-admin": None},
            "KeyExpiry": None,
        },
    }
    if exit_node_status_online is not None:
        doc["ExitNodeStatus"] = {"ID": "nexit", "Online": exit_node_status_online, "TailscaleIPs": [f"{exit_ip}/32"]}
    doc.update(
        {
            "Health": [],
            "MagicDNSSuffix": "tailnet.example",
            "CurrentTailnet": {"Name": "example.com", "MagicDNSSuffix": "tailnet.example", "MagicDNSEnabled": True},
            "CertDomains": None,
            "Peer": {f"nodekey:{p['HostName']}": p for p in peers},
            "User": {"1": {"ID": 1, "LoginName": "tagged-devices", "DisplayName": "tagged devices"}},
            "ClientVersion": None,
        }
    )
    return doc


def exit_peer(exit_ip: str, **fields: bool) -> dict[str, Any]:
    values = {"online": True, "exit_node": True, "option": True} | fields
    return peer("exit", exit_ip, **values)


def bystander(**fields: bool) -> dict[str, Any]:
    """Another exit-capable node in the same tailnet, online and approved."""
    values = {"online": True, "exit_node": False, "option": True} | fields
    return peer("someone-elses-exit", OTHER_PEER_IP, **values)


def run_probe(
    tmp_path: Path, probe: Probe, document: dict[str, Any] | None, cli_exit: int = 0, ping_exit: int = 0
) -> bool:
    """Run the probe with `tailscale` answering `status --json` with `document`
    (or failing, as the CLI does while tailscaled is down), and a ping of the
    exit node with `ping_exit` (1: "no reply", no WireGuard session yet). True when Ready."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    payload = tmp_path / "status.json"
    payload.write_text("" if document is None else json.dumps(document, indent=2) + "\n")
    cli = bin_dir / "tailscale"
    cli.write_text(
        "#!/bin/sh\n"
        # Only the call the probe is meant to make is answered.
        'case "$*" in\n'
        '  *" status --json") ;;\n'
        f'  *" ping --tsmp -c 1 --timeout=3s {probe.exit_node_ip}") exit {ping_exit} ;;\n'
        '  *) echo "unexpected: $*" >&2; exit 64 ;;\n'
        "esac\n"
        f"cat {shlex.quote(str(payload))}\n"
        f"exit {cli_exit}\n"
    )
    cli.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    result = subprocess.run(probe.command, env=env, capture_output=True, text=True, timeout=10, check=False)
    assert "unexpected" not in result.stderr, result.stderr
    return result.returncode == 0


@pytest.fixture(params=["dev", "pinned"])
def probe(request: pytest.FixtureRequest) -> Probe:
    return rendered_probe({"dev": dev, "pinned": pinned}[request.param]())


def test_ready_when_the_exit_node_is_selected_approved_and_online(tmp_path: Path, probe: Probe) -> None:
    ip = probe.exit_node_ip
    assert run_probe(tmp_path, probe, status(ip, peers=[bystander(), exit_peer(ip)]))
    # The exit node's entry may come first or last in the peer map.
    assert run_probe(tmp_path, probe, status(ip, peers=[exit_peer(ip), bystander()]))


Document = Callable[[str], dict[str, Any]]
NOT_READY: dict[str, Document] = {
    "exit node offline": lambda ip: status(ip, peers=[exit_peer(ip, online=False)], exit_node_status_online=False),
    # tailscale v1.102.5 computes ExitNodeStatus from the last full netmap
    # (ipn/ipnlocal/local.go), so it can still say Online after the peer's own
    # entry went offline; the data-path suite has seen it lag and not lag.
    "exit node offline, ExitNodeStatus lagging": lambda ip: status(ip, peers=[exit_peer(ip, online=False)]),
    "exit routes not approved": lambda ip: status(ip, peers=[exit_peer(ip, option=False)]),
    "exit node not selected": lambda ip: status(
        ip, peers=[exit_peer(ip, exit_node=False)], exit_node_status_online=None
    ),
    "exit node removed from the tailnet": lambda ip: status(ip, peers=[bystander()], exit_node_status_online=None),
    "no peers at all": lambda ip: status(ip, peers=[], exit_node_status_online=None),
    "logged out": lambda ip: status(ip, backend="NeedsLogin", peers=[exit_peer(ip)]),
    "starting": lambda ip: status(ip, backend="Starting", peers=[exit_peer(ip)]),
    # Flags of different peers must not add up.
    "ours offline, another selected and online": lambda ip: status(
        ip, peers=[exit_peer(ip, online=False), bystander(exit_node=True)]
    ),
    "another online, then ours offline": lambda ip: status(ip, peers=[bystander(), exit_peer(ip, online=False)]),
    "another selected, then ours": lambda ip: status(
        ip, peers=[bystander(exit_node=True), exit_peer(ip, exit_node=False)]
    ),
    "ours unapproved, another approved": lambda ip: status(ip, peers=[bystander(), exit_peer(ip, option=False)]),
    # The address is matched whole: a peer at a longer address is not ours.
    "only a longer address": lambda ip: status(
        ip, peers=[peer("near", ip + "0", online=True, exit_node=True, option=True)]
    ),
}


@pytest.mark.parametrize("case", sorted(NOT_READY))
def test_not_ready(tmp_path: Path, probe: Probe, case: str) -> None:
    assert not run_probe(tmp_path, probe, NOT_READY[case](probe.exit_node_ip))


def test_not_ready_until_the_exit_node_answers_a_ping(tmp_path: Path, probe: Probe) -> None:
    # Online, selected and approved by the control plane's word, but no
    # WireGuard session yet (the default stack's first seconds): not Ready.
    ip = probe.exit_node_ip
    assert not run_probe(tmp_path, probe, status(ip, peers=[exit_peer(ip)]), ping_exit=1)


def test_not_ready_when_tailscaled_does_not_answer(tmp_path: Path, probe: Probe) -> None:
    assert not run_probe(tmp_path, probe, None, cli_exit=1)
