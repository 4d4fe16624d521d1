"""Where a relay's CPU goes: its tailscaled's own CPU profile, by component.

`make bench-cluster` compares CPU seconds per byte between the userspace and
the kernel-mode relay; this says what those seconds are spent on. tailscaled
serves Go's CPU profile on its LocalAPI (`tailscale debug --cpu-profile`);
`go tool pprof -traces` prints every sampled stack. A sample is garbage
collection's when the collector is anywhere in its stack (it works for
whoever allocated); otherwise it belongs to the component of the frame
nearest the leaf that has one, so that a copy or an allocation counts for
the code that asked for it (a memmove in netstack's GRO is netstack's, the
cipher called by WireGuard is the cipher's).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

GARBAGE_COLLECTION = "garbage collection"
GC_MARKERS = ("runtime.gcBgMarkWorker", "runtime.gcAssistAlloc", "runtime.bgsweep", "runtime.bgscavenge",
              "runtime.gcStart", "runtime.gcDrain", "runtime.markroot", "runtime.scavenge")  # fmt: skip

# (component, function-name prefixes), in the order a frame is tried: the
# more specific first (wireguard-go's tun package before wireguard-go).
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ChaCha20-Poly1305", ("golang.org/x/crypto/chacha20", "golang.org/x/crypto/internal/poly1305",
                           "vendor/golang.org/x/crypto/chacha20")),
    ("netstack TCP/IP (gVisor and its glue)", ("gvisor.dev/gvisor/", "tailscale.com/wgengine/netstack")),
    ("TUN device and packet filter", ("github.com/tailscale/wireguard-go/tun", "tailscale.com/net/tstun.",
                                      "tailscale.com/wgengine/filter.")),
    ("WireGuard and UDP (magicsock)", ("github.com/tailscale/wireguard-go/", "tailscale.com/wgengine/magicsock.",
                                       "tailscale.com/net/batching.")),
    ("proxies (HTTP CONNECT, SOCKS5)", ("tailscale.com/net/proxymux.", "tailscale.com/net/socks5.",
                                        "tailscale.com/cmd/tailscaled.", "net/http.", "io.Copy", "net.(*")),
)  # fmt: skip
# Stacks of the runtime alone: the scheduler looking for work, timers, the network poller.
SCHEDULER = "Go scheduler and timers"
SCHEDULER_MARKERS = ("runtime.schedule", "runtime.findRunnable", "runtime.mcall", "runtime.park_m",
                     "runtime.netpoll", "runtime.sysmon", "runtime.mstart", "runtime.goexit0")  # fmt: skip
OTHER = "other"

_SEPARATOR = re.compile(r"^-+\+-+$")
_VALUE = re.compile(r"^\s*([0-9.]+)(ns|us|ms|s)\s+(\S.*)$")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


class ProfileError(RuntimeError):
    pass


@dataclass(frozen=True)
class Sample:
    seconds: float
    frames: tuple[str, ...]  # function names, leaf first


def parse_traces(text: str) -> list[Sample]:
    """The samples of `go tool pprof -traces` output: each stack with its CPU time."""
    samples: list[Sample] = []
    block: list[str] = []
    for line in [*text.splitlines(), "-----------+---"]:
        if not _SEPARATOR.match(line.strip()):
            block.append(line)
            continue
        first = _VALUE.match(block[0]) if block else None
        if first:
            seconds = float(first.group(1)) * _UNIT_SECONDS[first.group(2)]
            frames = [first.group(3), *(ln.strip() for ln in block[1:] if ln.strip())]
            samples.append(Sample(seconds, tuple(f.removesuffix(" (inline)") for f in frames)))
        block = []
    return samples


def component(frames: Sequence[str]) -> str:
    """The component a stack (leaf first) is charged to."""
    if any(f.startswith(GC_MARKERS) for f in frames):
        return GARBAGE_COLLECTION
    for f in frames:
        for name, prefixes in COMPONENTS:
            if f.startswith(prefixes):
                return name
    if any(f.startswith(SCHEDULER_MARKERS) for f in frames):
        return SCHEDULER
    return OTHER


def by_component(samples: Iterable[Sample]) -> dict[str, float]:
    """CPU seconds per component, largest first."""
    totals: dict[str, float] = {}
    for s in samples:
        key = component(s.frames)
        totals[key] = totals.get(key, 0.0) + s.seconds
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def read(path: Path) -> list[Sample]:
    """The samples of a pprof CPU profile file (with `go tool pprof`)."""
    try:
        done = subprocess.run(
            ["go", "tool", "pprof", "-traces", str(path)], capture_output=True, text=True, timeout=120, check=False
        )
    except FileNotFoundError:
        raise ProfileError(f"go is not on PATH: it reads the profile {path} (`go tool pprof`); install Go") from None
    if done.returncode != 0:
        raise ProfileError(f"go tool pprof -traces {path} failed: {done.stderr.strip()}")
    samples = parse_traces(done.stdout)
    if not samples:
        raise ProfileError(f"{path} holds no samples (was the relay idle while it was profiled?)")
    return samples


def shares(totals: Mapping[str, float]) -> str:
    """One line: each component's share of the profile's CPU time and its seconds."""
    whole = sum(totals.values()) or float("nan")
    return ", ".join(f"{k} {v / whole:.0%} ({v:.2f} s)" for k, v in totals.items())
