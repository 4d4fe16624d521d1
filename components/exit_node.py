"""HetznerExitNode: the VM that carries the relay's traffic to the internet.

A firewall (WireGuard in, no SSH unless source CIDRs are configured) and a
server whose cloud-init joins the tailnet with `--advertise-exit-node`. The
user_data carries the auth key and is a secret; changing it replaces the VM,
and the new VM gets a new hostname, so a stale device never matches.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_hcloud as hcloud

from builders.cloud_init import ExitNodeBoot, render_cloud_init
from builders.names import StackNames
from builders.networks import WIREGUARD_PORT
from config import ExitNodeConfig

ANYWHERE = ["0.0.0.0/0", "::/0"]


def firewall_rules(ssh_allowed_cidrs: list[str]) -> list[dict[str, object]]:
    """Inbound rules: WireGuard (direct connections) and ICMP (path MTU) from
    anywhere; SSH only from the configured CIDRs. Outbound is open."""
    rules: list[dict[str, object]] = [
        {"direction": "in", "protocol": "udp", "port": str(WIREGUARD_PORT), "source_ips": ANYWHERE,
         "description": "Tailscale direct connections"},
        {"direction": "in", "protocol": "icmp", "source_ips": ANYWHERE, "description": "ICMP (path MTU discovery)"},
    ]  # fmt: skip
    if ssh_allowed_cidrs:
        rules.append(
            {"direction": "in", "protocol": "tcp", "port": "22", "source_ips": ssh_allowed_cidrs, "description": "SSH"}
        )
    return rules


@dataclass(frozen=True)
class HetznerExitNodeArgs:
    exit_node: ExitNodeConfig
    names: StackNames
    auth_key: pulumi.Output[str]
    # Changes whenever the auth key is replaced: names the VM generation.
    key_id: pulumi.Output[str]


class HetznerExitNode(pulumi.ComponentResource):
    hostname: pulumi.Output[str]
    public_ips: pulumi.Output[list[str]]

    def __init__(self, name: str, args: HetznerExitNodeArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tailscale-egress:exit-node:HetznerExitNode", name, None, opts)
        cfg, names = args.exit_node, args.names
        child = pulumi.ResourceOptions(parent=self)

        firewall = hcloud.Firewall(
            f"{name}-firewall",
            name=args.key_id.apply(names.firewall),
            labels=names.labels,
            rules=firewall_rules(cfg.ssh_allowed_cidrs),  # type: ignore[arg-type]
            opts=child,
        )
        hostname = args.key_id.apply(names.exit_node_hostname)
        document: pulumi.Output[str] = pulumi.Output.all(hostname, args.auth_key).apply(
            lambda v: render_cloud_init(ExitNodeBoot(hostname=v[0], image=cfg.image, auth_key=v[1]))
        )
        user_data: pulumi.Output[str] = pulumi.Output.secret(document)
        server = hcloud.Server(
            f"{name}-server",
            name=hostname,
            server_type=cfg.server_type,
            image=cfg.image,
            location=cfg.location,
            user_data=user_data,
            firewall_ids=[firewall.id.apply(int)],
            public_nets=[{"ipv4_enabled": True, "ipv6_enabled": True}],
            labels=names.labels,
            # An ACPI shutdown first: the VM logs out of the tailnet on power-off.
            shutdown_before_deletion=True,
            opts=pulumi.ResourceOptions(
                parent=self,
                additional_secret_outputs=["user_data"],
                delete_before_replace=False,
            ),
        )
        # Known only once the server exists, so nothing looks for the device before.
        self.hostname = server.name
        self.public_ips = pulumi.Output.all(server.ipv4_address, server.ipv6_address).apply(
            lambda ips: [ip for ip in ips if ip]
        )
        self.register_outputs({"hostname": self.hostname, "public_ips": self.public_ips})
