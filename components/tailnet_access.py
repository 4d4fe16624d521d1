"""TailnetAccess: the tailnet side of the stack, before any machine exists.

Tagged auth keys for the exit node (single-use, ephemeral, pre-authorized,
short-lived) and the relay (reusable, ephemeral, pre-authorized), and, only
when `tailnet.managePolicy` is set, the tailnet policy file itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_tailscale as tailscale

from builders.names import StackNames
from builders.tailnet_policy import merged_policy
from config import PROJECT, TailnetConfig

RELAY_KEY_EXPIRY_SECONDS = 90 * 24 * 3600


@dataclass(frozen=True)
class TailnetAccessArgs:
    tailnet: TailnetConfig
    names: StackNames
    needs_exit_node_key: bool
    current_policy: Mapping[str, Any] | None


class TailnetAccess(pulumi.ComponentResource):
    exit_node_auth_key: pulumi.Output[str] | None
    exit_node_key_id: pulumi.Output[str] | None
    relay_auth_key: pulumi.Output[str]

    def __init__(self, name: str, args: TailnetAccessArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tailscale-egress:tailnet:TailnetAccess", name, None, opts)
        t = args.tailnet
        child = pulumi.ResourceOptions(parent=self)
        self.exit_node_auth_key = self.exit_node_key_id = None

        if t.login_server is not None:
            # A self-hosted control server: keys are minted there, handed to us as a secret.
            self.relay_auth_key = pulumi.Config(PROJECT).require_secret("relayAuthKey")
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
                description=args.names.key_description("exit node"),
                tags=[t.exit_node_tag],
                reusable=False,
                ephemeral=True,
                preauthorized=True,
                expiry=t.exit_node_key_expiry_seconds,
                # Spent once the VM joins; a new key would replace the VM.
                recreate_if_invalid="never",
                opts=child,
            )
            self.exit_node_auth_key = pulumi.Output.secret(exit_key.key)
            self.exit_node_key_id = exit_key.id

        relay_key = tailscale.TailnetKey(
            f"{name}-relay-key",
            description=args.names.key_description("relay"),
            tags=[t.relay_tag],
            reusable=True,
            ephemeral=True,
            preauthorized=True,
            expiry=RELAY_KEY_EXPIRY_SECONDS,
            # An expired relay key is replaced at the next `pulumi up`.
            recreate_if_invalid="always",
            opts=child,
        )
        self.relay_auth_key = pulumi.Output.secret(relay_key.key)
        self.register_outputs({})
