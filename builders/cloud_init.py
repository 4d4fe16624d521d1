"""The exit node's cloud-init document.

The VM installs Tailscale from its signed apt repository (the key ships in
the document and is checked against its pinned fingerprint when rendered: no
keyserver at boot), enables forwarding, drops whatever the tailnet sends to
the VM itself (it forwards, it serves nothing), joins as an exit node, keeps
itself patched, and logs out when it is powered off so that deleting the
server removes the device from the tailnet. The document carries the auth
key: callers must treat the whole result as a secret. Once the node has
joined, the VM deletes cloud-init's copies of the document and turns
cloud-init off, so no later boot fetches or stores it again.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import yaml

from builders import openpgp
from config import EXIT_NODE_IMAGES

# Tailscale Inc. package repository signing key (RSA 4096, 2020), as
# pkgs.tailscale.com publishes it (stable/debian/bookworm.asc).
TAILSCALE_KEY_FINGERPRINT: Final = "2596A99EAAB33821893C0A79458CA832957F5868"
TAILSCALE_KEY_FILE: Final = Path(__file__).parent / "keys" / "tailscale-archive-keyring.asc"
SYSCTL_PATH: Final = "/etc/sysctl.d/99-tailscale-exit-node.conf"
AUTH_KEY_PATH: Final = "/run/tailscale-egress/authkey"
UP_SCRIPT_PATH: Final = "/usr/local/sbin/tailscale-egress-up"
LOGOUT_SCRIPT_PATH: Final = "/usr/local/sbin/tailscale-egress-logout"
LOGOUT_UNIT: Final = "tailscale-egress-logout.service"
GUARD_SCRIPT_PATH: Final = "/usr/local/sbin/tailscale-egress-guard"
GUARD_UNIT: Final = "tailscale-egress-guard.service"
# Written before the tailscale package installs, so that tailscaled never runs
# unguarded, not even when the package's own script starts it on first boot.
TAILSCALED_DROP_IN: Final = "/etc/systemd/system/tailscaled.service.d/10-tailscale-egress-guard.conf"
# cloud-init's documented switch: with it, cloud-init does nothing at boot.
CLOUD_INIT_DISABLED: Final = "/etc/cloud/cloud-init.disabled"
# The interface tailscaled creates (its default --tun name).
TAILNET_INTERFACE: Final = "tailscale0"


@dataclass(frozen=True)
class AptSigningKey:
    """An apt repository's signing key: the armored key the document ships,
    and the fingerprint it must have (checked here, so a wrong key text fails
    at render time, before any VM exists)."""

    fingerprint: str
    armored: str

    def __post_init__(self) -> None:
        actual = openpgp.fingerprint(self.armored)
        if actual != self.fingerprint.replace(" ", "").upper():
            raise ValueError(f"the apt signing key's fingerprint is {actual}, not the pinned {self.fingerprint}")


TAILSCALE_SIGNING_KEY: Final = AptSigningKey(TAILSCALE_KEY_FINGERPRINT, TAILSCALE_KEY_FILE.read_text())


@dataclass(frozen=True)
class ExitNodeBoot:
    hostname: str
    image: str
    auth_key: str


def up_script(boot: ExitNodeBoot) -> str:
    """Joins the tailnet as an exit node; run once by cloud-init."""
    up = ["tailscale", "up", f"--auth-key=file:{AUTH_KEY_PATH}", f"--hostname={boot.hostname}", "--advertise-exit-node"]
    return f"""#!/bin/sh
# Joins the tailnet as an exit node. Written and run once by cloud-init.
set -eu
# Only this file: "sysctl --system" fails on any unrelated file of the image.
sysctl -p {SYSCTL_PATH} >/dev/null
systemctl enable --now {GUARD_UNIT}
systemctl enable --now tailscaled
# Before the join: a VM powered off at any moment after it (a destroy right
# after `up`) logs out and leaves the tailnet.
systemctl enable --now {LOGOUT_UNIT}
{shlex.join(up)}
# The key is single-use and spent now; do not leave it on disk.
rm -f {AUTH_KEY_PATH}
# cloud-init keeps the whole document (the key in it) under /var/lib/cloud and
# would fetch and store it again at every boot: turn it off, then delete its
# copies and discard their blocks where the disk supports it.
touch {CLOUD_INIT_DISABLED}
rm -f /var/lib/cloud/instances/*/user-data.txt /var/lib/cloud/instances/*/user-data.txt.i \\
  /var/lib/cloud/instances/*/cloud-config.txt /var/lib/cloud/instances/*/obj.pkl \\
  /var/lib/cloud/instances/*/scripts/runcmd
# The journal must commit the deletes first, or fstrim finds those blocks in use.
sync
fstrim / || true
"""


def guard_script() -> str:
    """Drops packets that arrive from the tailnet addressed to this VM (its
    tailnet and public addresses alike: sshd, anything listening), IPv4 and
    IPv6; replies to the VM's own connections pass, forwarded traffic is not
    touched. A relay's pod can reach the VM's public address through the exit
    node (it is part of autogroup:internet), past the Hetzner firewall.

    The rules live in the mangle table, which tailscaled does not manage: its
    ts-input chain (filter table) accepts everything from the tailnet
    interface and is put back first in INPUT whenever tailscaled starts,
    while a DROP in mangle INPUT comes earlier and is final. Idempotent."""
    rules = (
        # Only replies to connections the VM opened: --ctdir REPLY. A connection
        # from the tailnet that was open before the rules is cut, not kept.
        f"-A TSE-GUARD -i {TAILNET_INTERFACE} -m conntrack --ctstate ESTABLISHED,RELATED --ctdir REPLY -j RETURN",
        f"-A TSE-GUARD -i {TAILNET_INTERFACE} -j DROP",
    )
    body = "\n".join(f'  "$ipt" -w -t mangle {rule}' for rule in rules)
    return f"""#!/bin/sh
# This exit node forwards; it serves nothing to the tailnet. Run at boot
# before tailscaled ({GUARD_UNIT}); see builders/cloud_init.py.
set -eu
for ipt in iptables ip6tables; do
  "$ipt" -w -t mangle -N TSE-GUARD 2>/dev/null || "$ipt" -w -t mangle -F TSE-GUARD
{body}
  "$ipt" -w -t mangle -C INPUT -j TSE-GUARD 2>/dev/null || "$ipt" -w -t mangle -I INPUT 1 -j TSE-GUARD
done
"""


def guard_unit() -> str:
    # Before the network and tailscaled at every boot. No default dependencies:
    # those order it after basic.target, which cloud-init.service (itself after
    # networking.service) must precede, and that cycle cost the VM its network
    # on every boot after the first. The rules need only the root filesystem.
    return f"""[Unit]
Description=Drop traffic from the tailnet addressed to this exit node itself
DefaultDependencies=no
After=local-fs.target
Before=network-pre.target tailscaled.service shutdown.target
Wants=network-pre.target
Conflicts=shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={GUARD_SCRIPT_PATH}

[Install]
WantedBy=multi-user.target
"""


def tailscaled_drop_in() -> str:
    # Required by tailscaled whenever it starts (the package's install script,
    # an upgrade, a boot): if the rules cannot be set, tailscaled does not
    # start and the relay fails closed.
    return f"""[Unit]
Requires={GUARD_UNIT}
After={GUARD_UNIT}
"""


def logout_script() -> str:
    """Runs when its unit stops: on power-off (Hetzner deleting the server
    after its ACPI shutdown) the node logs out and leaves the tailnet at once;
    on a reboot (unattended upgrades) or any stop while the system keeps
    running, it stays."""
    return """#!/bin/sh
set -eu
if [ "$(systemctl is-system-running || true)" != stopping ]; then
  exit 0
fi
if systemctl list-jobs --no-legend | grep -Eq '^[0-9]+ +reboot\\.target +start'; then
  exit 0
fi
exec tailscale logout
"""


def logout_unit() -> str:
    # Active from boot; its ExecStop runs at shutdown before tailscaled stops
    # (units stop in the reverse of their start order). Wants=, not Requires=:
    # a tailscaled restarted by an upgrade must not stop (and so run) this unit.
    # After network.target: stopped before the network goes down. Once
    # cloud-init is off nothing else pulls in network-online.target, and an
    # ordering on a target that is not active orders nothing: the VM took its
    # network down while the logout ran, and the node stayed in the tailnet.
    return f"""[Unit]
Description=Log this exit node out of the tailnet when the VM is powered off
After=tailscaled.service network.target network-online.target
Wants=tailscaled.service network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
ExecStop={LOGOUT_SCRIPT_PATH}
TimeoutStopSec=30

[Install]
WantedBy=multi-user.target
"""


SYSCTL: Final = """# Forwarding for a Tailscale exit node.
net.ipv4.ip_forward = 1
net.ipv6.conf.all.forwarding = 1
"""

UNATTENDED_UPGRADES: Final = """// Security updates and Tailscale releases, installed daily; reboot at night if needed.
APT::Periodic::Update-Package-Lists "1";
APT::Periodic::Unattended-Upgrade "1";
Unattended-Upgrade::Origins-Pattern { "site=pkgs.tailscale.com"; };
Unattended-Upgrade::Automatic-Reboot "true";
Unattended-Upgrade::Automatic-Reboot-Time "04:00";
"""


def cloud_config(boot: ExitNodeBoot, signing_key: AptSigningKey = TAILSCALE_SIGNING_KEY) -> dict[str, object]:
    distro, codename = EXIT_NODE_IMAGES[boot.image]
    return {
        "hostname": boot.hostname,
        "preserve_hostname": False,
        "ssh_pwauth": False,
        "package_update": True,
        "package_upgrade": True,
        "apt": {
            "sources": {
                "tailscale.list": {
                    "source": f"deb [signed-by=$KEY_FILE] https://pkgs.tailscale.com/stable/{distro} {codename} main",
                    "key": signing_key.armored,
                }
            }
        },
        "packages": ["tailscale", "iptables", "unattended-upgrades"],
        "write_files": [
            {"path": SYSCTL_PATH, "content": SYSCTL, "permissions": "0644"},
            {"path": "/etc/apt/apt.conf.d/52tailscale-egress", "content": UNATTENDED_UPGRADES, "permissions": "0644"},
            {"path": AUTH_KEY_PATH, "content": boot.auth_key, "permissions": "0600", "owner": "root:root"},
            {"path": GUARD_SCRIPT_PATH, "content": guard_script(), "permissions": "0755"},
            {"path": f"/etc/systemd/system/{GUARD_UNIT}", "content": guard_unit(), "permissions": "0644"},
            {"path": TAILSCALED_DROP_IN, "content": tailscaled_drop_in(), "permissions": "0644"},
            {"path": UP_SCRIPT_PATH, "content": up_script(boot), "permissions": "0755"},
            {"path": LOGOUT_SCRIPT_PATH, "content": logout_script(), "permissions": "0755"},
            {"path": f"/etc/systemd/system/{LOGOUT_UNIT}", "content": logout_unit(), "permissions": "0644"},
        ],
        "runcmd": [[UP_SCRIPT_PATH]],
    }


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (scripts, unit files) as readable `|` blocks."""


_BlockDumper.add_representer(
    str,
    lambda dumper, s: dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def render_cloud_init(boot: ExitNodeBoot, signing_key: AptSigningKey = TAILSCALE_SIGNING_KEY) -> str:
    """The user_data document (a secret: it carries the auth key). Tests pass
    their own repository's `signing_key`; the program always uses Tailscale's."""
    body: str = yaml.dump(cloud_config(boot, signing_key), Dumper=_BlockDumper, sort_keys=False, width=1000)
    return "#cloud-config\n" + body


SHELL_SCRIPTS: Final = (UP_SCRIPT_PATH, LOGOUT_SCRIPT_PATH, GUARD_SCRIPT_PATH)
