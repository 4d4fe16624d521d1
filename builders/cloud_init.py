"""The exit node's cloud-init document.

The VM installs Tailscale from its signed apt repository (key pinned by
fingerprint), enables forwarding, joins as an exit node, keeps itself patched,
and logs out when it is powered off so that deleting the server removes the
device from the tailnet. The document carries the auth key: callers must
treat the whole result as a secret.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Final

import yaml

from config import EXIT_NODE_IMAGES

# Tailscale Inc. package repository signing key (RSA 4096, 2020).
TAILSCALE_KEY_FINGERPRINT: Final = "2596A99EAAB33821893C0A79458CA832957F5868"
AUTH_KEY_PATH: Final = "/run/tailscale-egress/authkey"
UP_SCRIPT_PATH: Final = "/usr/local/sbin/tailscale-egress-up"
LOGOUT_SCRIPT_PATH: Final = "/usr/local/sbin/tailscale-egress-logout"
LOGOUT_UNIT: Final = "tailscale-egress-logout.service"


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
sysctl --system >/dev/null
systemctl enable --now tailscaled
{shlex.join(up)}
# The key is single-use and spent now; do not leave it on disk.
rm -f {AUTH_KEY_PATH}
systemctl enable --now {LOGOUT_UNIT}
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
    return f"""[Unit]
Description=Log this exit node out of the tailnet when the VM is powered off
After=tailscaled.service network-online.target
Wants=tailscaled.service

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


def cloud_config(boot: ExitNodeBoot) -> dict[str, object]:
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
                    "keyid": TAILSCALE_KEY_FINGERPRINT,
                }
            }
        },
        "packages": ["tailscale", "unattended-upgrades"],
        "write_files": [
            {"path": "/etc/sysctl.d/99-tailscale-exit-node.conf", "content": SYSCTL, "permissions": "0644"},
            {"path": "/etc/apt/apt.conf.d/52tailscale-egress", "content": UNATTENDED_UPGRADES, "permissions": "0644"},
            {"path": AUTH_KEY_PATH, "content": boot.auth_key, "permissions": "0600", "owner": "root:root"},
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


def render_cloud_init(boot: ExitNodeBoot) -> str:
    """The user_data document (a secret: it carries the auth key)."""
    body: str = yaml.dump(cloud_config(boot), Dumper=_BlockDumper, sort_keys=False, width=1000)
    return "#cloud-config\n" + body


SHELL_SCRIPTS: Final = (UP_SCRIPT_PATH, LOGOUT_SCRIPT_PATH)
