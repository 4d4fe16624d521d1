"""Stack-scoped names, so many developer stacks share one tailnet and one
Hetzner project without colliding."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_NOT_DNS = re.compile(r"[^a-z0-9-]+")


def dns_label(text: str, max_length: int = 63) -> str:
    """Lower-case `text` into an RFC 1123 label (letters, digits, inner hyphens)."""
    label = _NOT_DNS.sub("-", text.lower()).strip("-")
    return label[:max_length].rstrip("-") or "x"


@dataclass(frozen=True)
class StackNames:
    """Every name the stack gives to something outside Kubernetes namespaces.

    `prefix` carries the stack name plus a short hash of the exact project and
    stack names, so two stacks whose names differ only in characters a DNS
    label cannot hold ("Alice" and "alice", "a.b" and "a-b") still differ.
    """

    prefix: str

    @classmethod
    def for_stack(cls, project: str, stack: str) -> StackNames:
        digest = hashlib.sha256(f"{project}/{stack}".encode()).hexdigest()[:6]
        return cls(prefix=f"te-{dns_label(stack, 30)}-{digest}")

    def exit_node_hostname(self, generation: str) -> str:
        """Hostname of one exit node VM generation, in Hetzner and the tailnet.

        `generation` is the ID of the auth key that the VM's user_data carries:
        it changes whenever the VM is replaced, so a stale device of an earlier
        VM never has the name the stack waits for, and the tailnet minted it
        for this stack alone, so two stacks of the same name (in two backends,
        one Hetzner project and one tailnet) never share it.
        """
        return dns_label(f"{self.prefix}-exit-{_generation_suffix(generation)}")

    @property
    def relay_hostname(self) -> str:
        return dns_label(f"{self.prefix}-relay")

    def firewall(self, generation: str) -> str:
        """The exit node's Hetzner firewall, one per VM generation: Hetzner
        names are unique per project, and the project and stack names alone
        are the same for every developer's `dev` stack."""
        return dns_label(f"{self.prefix}-fw-{_generation_suffix(generation)}")

    def key_description(self, role: str) -> str:
        # Tailscale allows only alphanumerics, spaces and hyphens here, at
        # most 50; the role (which may carry a key generation) is kept whole.
        return f"{self.prefix[: 49 - len(role)]} {role}"

    @property
    def labels(self) -> dict[str, str]:
        """Hetzner labels that say which stack owns a server or firewall."""
        return {"managed-by": "tailscale-egress", "stack": self.prefix}


def _generation_suffix(generation: str) -> str:
    # Tailscale key IDs end in a constant "CNTRL"; the part before it varies.
    return dns_label(generation).removesuffix("cntrl").rstrip("-")[-8:]


def vm_spec(server_type: str, location: str, image: str) -> str:
    """A short digest of what the exit node VM cannot change in place.

    It goes into the exit node key's description, which replaces the key
    when it changes, and a new key is a new VM generation: new hostname, new
    firewall, new user_data, so the server is replaced (created before the old
    one is shut down and deleted) instead of resized in place, which the hcloud
    provider does with a hard power-off and leaves the VM off.
    """
    return hashlib.sha256(f"{server_type}/{location}/{image}".encode()).hexdigest()[:8]
