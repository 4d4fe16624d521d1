"""The exit node guard for an exit node the stack does not create (your own,
or one joined to Headscale): the same script and units the Hetzner VM gets
from its cloud-init document, and the commands that install them.

The guard drops traffic from the tailnet addressed to the exit node itself
(its SSH and anything else listening, at its tailnet and public addresses),
whatever the tailnet policy allows; tailscaled is made to require it, so it
does not start without the rules."""

from __future__ import annotations

from typing import Final

from builders.cloud_init import (
    GUARD_SCRIPT_PATH,
    GUARD_UNIT,
    TAILSCALED_DROP_IN,
    guard_script,
    guard_unit,
    tailscaled_drop_in,
)

INSTALL_SCRIPT: Final = "install.sh"


def guard_files() -> dict[str, tuple[str, str]]:
    """Each file's absolute path on the exit node -> (mode, content)."""
    return {
        GUARD_SCRIPT_PATH: ("0755", guard_script()),
        f"/etc/systemd/system/{GUARD_UNIT}": ("0644", guard_unit()),
        TAILSCALED_DROP_IN: ("0644", tailscaled_drop_in()),
    }


def install_script() -> str:
    """Run as root on the exit node from the folder `tools/exit_node_guard.py`
    writes: puts the files in place, sets the rules now and at every boot
    before tailscaled, and restarts tailscaled under them."""
    copies = "\n".join(f'install -D -m {mode} "$here{path}" {path}' for path, (mode, _) in guard_files().items())
    return f"""#!/bin/sh
# The tailscale-egress exit node guard, for an exit node the stack does not create.
set -eu
[ "$(id -u)" -eq 0 ] || {{ echo "run as root: sudo sh $0" >&2; exit 1; }}
command -v ip6tables >/dev/null || {{ echo "ip6tables not found: install iptables first" >&2; exit 1; }}
here=$(cd "$(dirname "$0")" && pwd)
{copies}
systemctl daemon-reload
systemctl enable --now {GUARD_UNIT}
systemctl restart tailscaled.service
for ipt in iptables ip6tables; do
  "$ipt" -w -t mangle -S INPUT | sed -n 2p | grep -qx -- '-A INPUT -j TSE-GUARD' || {{
    echo "$ipt: the guard is not first in mangle INPUT" >&2
    exit 1
  }}
done
echo "exit node guard installed: traffic from the tailnet to this node itself is dropped"
"""
