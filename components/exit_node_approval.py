"""ExitNodeApproval: finds the exit node's device once it has joined and
approves its exit routes through the Tailscale API: no click in the admin
console."""

from __future__ import annotations

import ipaddress

import pulumi
import pulumi_tailscale as tailscale

from builders.networks import EXIT_ROUTES, TAILNET_IPV4

# cloud-init installs Tailscale before joining: a few minutes on a small VM.
DEVICE_WAIT = "10m"


def tailnet_ipv4(addresses: list[str]) -> str:
    for address in addresses:
        if ipaddress.ip_address(address) in TAILNET_IPV4:
            return address
    raise ValueError(f"the exit node has no tailnet IPv4 address among {addresses}")


class ExitNodeApproval(pulumi.ComponentResource):
    tailnet_ip: pulumi.Output[str]

    def __init__(self, name: str, hostname: pulumi.Output[str], opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tailscale-egress:tailnet:ExitNodeApproval", name, None, opts)
        device = tailscale.get_device_output(
            hostname=hostname, wait_for=DEVICE_WAIT, opts=pulumi.InvokeOptions(parent=self)
        )
        routes = tailscale.DeviceSubnetRoutes(
            f"{name}-routes",
            device_id=device.node_id,
            routes=list(EXIT_ROUTES),
            opts=pulumi.ResourceOptions(parent=self),
        )
        # Resolves only after the approval: whatever uses the IP waits for it.
        self.tailnet_ip = pulumi.Output.all(routes.id, device.addresses).apply(lambda v: tailnet_ipv4(v[1]))
        self.register_outputs({"tailnet_ip": self.tailnet_ip})
