"""TailnetAccess: the tailnet side of the stack, before any machine exists.

Tagged auth keys for the exit node (single-use, ephemeral, pre-authorized,
short-lived) and the relay (reusable, ephemeral, pre-authorized, renewed by
`pulumi up` once half of its lifetime has passed), and, only when
`tailnet.managePolicy` is set, the tailnet policy file itself. With the
relay's key given (`relayAuthKey`), nothing here touches Tailscale's API.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_tailscale as tailscale

from builders.names import StackNames
from builders.tailnet_policy import merged_policy
from config import TailnetConfig


def relay_key_generation(now: float, expiry_seconds: int) -> int:
    """Which relay key is current at `now`: a new one every half lifetime, so
    that after any `pulumi up` the relay's key has at least half its lifetime
    left (a relay restarting later can still join) and none is older than its
    lifetime (a leaked key stops working within it)."""
    return int(now // (expiry_seconds // 2))


@dataclass(frozen=True)
class TailnetAccessArgs:
    tailnet: TailnetConfig
    names: StackNames
    needs_exit_node_key: bool
    current_policy: Mapping[str, Any] | None
    # builders.names.vm_spec of the exit node: a new one mints a new key, and so a new VM.
    exit_node_spec: str = ""
    # Given by the user (`relayAuthKey`): no Tailscale API is used at all.
    supplied_relay_key: pulumi.Output[str] | None = None


class TailnetAccess(pulumi.ComponentResource):
    exit_node_auth_key: pulumi.Output[str] | None
    exit_node_key_id: pulumi.Output[str] | None
    relay_auth_key: pulumi.Output[str]

    def __init__(self, name: str, args: TailnetAccessArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tailscale-egress:tailnet:TailnetAccess", name, None, opts)
        t = args.tailnet
        child = pulumi.ResourceOptions(parent=self)
        self.exit_node_auth_key = self.exit_node_key_id = None

        if args.supplied_relay_key is not None:
            # Minted elsewhere (a self-hosted control server, or by hand for
            # your own exit node) and handed to us as a secret.
            self.relay_auth_key = pulumi.Output.secret(args.supplied_relay_key)
            self.register_outputs({})
            return

        if t.manage_policy:
            policy = tailscale.Acl(
                f"{name}-policy",
                acl=json.dumps(merged_policy(args.current_policy or {}, t.exit_node_tag, t.relay_tag), indent=2),
                overwrite_existing_content=True,
                opts=child,
            )
            child = pulumi.ResourceOptions(parent=self, depends_on=[policy])

        if args.needs_exit_node_key:
            exit_key = tailscale.TailnetKey(
                f"{name}-exit-node-key",
                description=args.names.key_description(f"exit node {args.exit_node_spec}".strip()),
                tags=[t.exit_node_tag],
                reusable=False,
                ephemeral=True,
                preauthorized=True,
                expiry=t.exit_node_key_expiry_seconds,
                # Spent once the VM joins; a new key replaces the VM.
                recreate_if_invalid="never",
                opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(replace_on_changes=["description"])),
            )
            self.exit_node_auth_key = pulumi.Output.secret(exit_key.key)
            self.exit_node_key_id = exit_key.id

        # Reusable, because the relay keeps its node in memory and joins anew
        # on every restart; short-lived, because whoever reads it can join
        # devices as the relay until it expires (docs/security.md: the relay's key).
        expiry = t.relay_key_expiry_hours * 3600
        generation = relay_key_generation(time.time(), expiry)
        relay_key = tailscale.TailnetKey(
            f"{name}-relay-key",
            description=args.names.key_description(f"relay g{generation}"),
            tags=[t.relay_tag],
            reusable=True,
            ephemeral=True,
            preauthorized=True,
            expiry=expiry,
            # A key revoked or expired out of band is replaced at the next `pulumi up`.
            recreate_if_invalid="always",
            opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(replace_on_changes=["description"])),
        )
        self.relay_auth_key = pulumi.Output.secret(relay_key.key)
        self.register_outputs({})
