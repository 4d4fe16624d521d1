"""A WAN-shaped link between two network namespaces (issue 20's rig): the
repository's `wanlink` (scripts/go/wanlink) joins a TAP device in each, and
shapes both directions the way tc's netem and tbf would (a rate with a
tail-drop queue, half the round trip of delay each way, optional loss and
reordering). This machine's kernel has no netem and no fq, so the delay is
made in user space; `test_wan_link.py` measures that the link is what it says.
"""

from __future__ import annotations

import json
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LinkShape:
    """One profile of the bench's matrix."""

    rate_mbit: float
    rtt_ms: float
    loss_pct: float = 0.0
    reorder_pct: float = 0.0

    def args(self) -> list[str]:
        """wanlink's flags (also the -shape file's content)."""
        return [
            f"-rate={self.rate_mbit:g}mbit",
            f"-delay={self.rtt_ms / 2:g}ms",
            f"-loss={self.loss_pct:g}",
            f"-reorder={self.reorder_pct:g}",
        ]

    def tcp_ceiling_mbit(self, mtu: int = 1500) -> float:
        """TCP goodput at full link rate: payload (MTU less IP and TCP headers
        with timestamps) over what each frame occupies (MTU plus Ethernet's 14)."""
        return self.rate_mbit * (mtu - 52) / (mtu + 14)


def _ip(ns: str | None, *args: str) -> None:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


class WanLink:
    """`wanlink` between TAP `a_dev` in namespace `a_ns` and TAP `b_dev` in
    `b_ns`. The program runs in `a_ns`, where it creates both devices and
    attaches to them; `b_dev` then moves to `b_ns` (its file keeps working).
    The caller addresses the devices and brings them up. The shape lives in
    `shape_file`, so that `reshape` changes it without taking the link down."""

    def __init__(
        self, binary: Path, shape: LinkShape, a_ns: str, a_dev: str, b_ns: str, b_dev: str, shape_file: Path
    ) -> None:
        self.binary, self.shape, self.shape_file = binary, shape, shape_file
        self.a_ns, self.a_dev, self.b_ns, self.b_dev = a_ns, a_dev, b_ns, b_dev
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> WanLink:
        for dev in (self.a_dev, self.b_dev):
            _ip(self.a_ns, "tuntap", "add", "dev", dev, "mode", "tap")
        self.shape_file.write_text(" ".join(self.shape.args()) + "\n")
        command = [str(self.binary), "-a", self.a_dev, "-b", self.b_dev, f"-shape={self.shape_file}"]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.a_ns, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            raise RuntimeError(f"wanlink did not start: {line} {self.proc.stderr.read() if self.proc.stderr else ''}")
        _ip(self.a_ns, "link", "set", self.b_dev, "netns", self.b_ns)
        return self

    def reshape(self, shape: LinkShape) -> None:
        """The link shaped as `shape` from the next frame on; connections stay up."""
        assert self.proc is not None, "wanlink is not running"
        self.shape_file.write_text(" ".join(shape.args()) + "\n")
        self.proc.send_signal(signal.SIGHUP)
        self.shape = shape

    def stop(self) -> list[dict[str, Any]]:
        """Stops the program; its counters, one dict per direction."""
        if self.proc is None:
            return []
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=10)
        self.proc = None
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]
