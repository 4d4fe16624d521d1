"""A QEMU virtual machine for the boot tests (tests/boot/).

TCG only (`-accel tcg -cpu max`): /dev/kvm on these machines is kvm-pvm
inside Firecracker, where a stock Debian kernel never boots. The VM boots the
image's kernel and initramfs directly (`-kernel/-initrd`, no bootloader),
from a qcow2 overlay on the cached raw image (`discard=unmap`, so blocks the
guest trims fall back to the base image and a search of the disk's blocks
means something), with a NoCloud `cidata` seed as a second disk, one
virtio-net NIC on a tap device in a network namespace, and:

- the serial console (ttyS0) written to ``console.log``;
- QMP on a unix socket: ``system_powerdown`` (the ACPI power button, what
  Hetzner presses before deleting a server) and ``system_reset``;
- the test image's agent: a root shell on the virtio serial port
  ``tse.agent`` (scripts/build-boot-image.sh installs it), through which the
  tests run commands in the guest.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

QEMU = "qemu-system-x86_64"


class VmError(RuntimeError):
    pass


@dataclass(frozen=True)
class Result:
    rc: int
    out: str


@dataclass
class VmSpec:
    name: str
    workdir: Path
    kernel: Path
    initrd: Path
    base_disk: Path
    netns: str
    tap: str
    mac: str
    # Extra kernel command line, e.g. "ipv6.disable=1".
    cmdline: str = ""
    memory_mib: int = 1024


def make_seed(path: Path, user_data: str, instance_id: str, hostname: str, network_config: str = "") -> None:
    """A NoCloud seed: an ISO 9660 image labelled `cidata` with user-data,
    meta-data and, if given, network-config, as cloud-init's NoCloud
    datasource reads it."""
    d = path.parent / f"{path.stem}.d"
    d.mkdir(parents=True, exist_ok=True)
    (d / "user-data").write_text(user_data)
    (d / "meta-data").write_text(f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n")
    if network_config:
        (d / "network-config").write_text(network_config)
    subprocess.run(
        ["genisoimage", "-quiet", "-output", str(path), "-volid", "cidata", "-joliet", "-rock", str(d)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


@dataclass
class Vm:
    spec: VmSpec
    seed: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    _agent: socket.socket | None = field(default=None, repr=False)
    _buf: str = ""

    @property
    def dir(self) -> Path:
        return self.spec.workdir

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    def create_disk(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            # 4 KiB clusters, the filesystem's block: a discard of one freed block is not lost in a 64 KiB cluster.
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4096",
                "-F",
                "raw",
                "-b",
                str(self.spec.base_disk),
                str(self.disk),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def command(self) -> list[str]:
        s = self.spec
        # eth0 as on Hetzner's images (they boot with net.ifnames=0).
        append = f"root=/dev/vda ro console=ttyS0 net.ifnames=0 {s.cmdline}".strip()
        return [
            QEMU,
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-machine",
            "q35",
            "-m",
            str(s.memory_mib),
            "-smp",
            "1",
            "-nodefaults",
            "-display",
            "none",
            "-kernel",
            str(s.kernel),
            "-initrd",
            str(s.initrd),
            "-append",
            append,
            "-chardev",
            f"file,id=ser0,path={self.console_log}",
            "-serial",
            "chardev:ser0",
            "-qmp",
            f"unix:{self.dir / 'qmp.sock'},server=on,wait=off",
            "-drive",
            f"file={self.disk},if=virtio,format=qcow2,discard=unmap,cache=unsafe",
            "-drive",
            f"file={self.seed},if=virtio,format=raw,readonly=on",
            "-netdev",
            f"tap,id=n0,ifname={s.tap},script=no,downscript=no",
            "-device",
            f"virtio-net-pci,netdev=n0,mac={s.mac}",
            "-device",
            "virtio-rng-pci",
            "-device",
            "virtio-serial-pci",
            "-chardev",
            f"socket,id=agent,path={self.dir / 'agent.sock'},server=on,wait=off",
            "-device",
            "virtserialport,chardev=agent,name=tse.agent",
        ]

    def start(self) -> None:
        if not self.disk.exists():
            self.create_disk()
        log = (self.dir / "qemu.log").open("ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.spec.netns, *self.command()],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while not (self.dir / "agent.sock").exists():
            if self.proc.poll() is not None:
                raise VmError(f"qemu exited rc={self.proc.returncode}: {(self.dir / 'qemu.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise VmError("qemu did not create its agent socket in 30s")
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self._close_agent()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    # ------------------------------------------------------------- QMP
    def qmp(self, command: str) -> dict[str, object]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(self.dir / "qmp.sock"))
            f = s.makefile("rw")
            json.loads(f.readline())  # greeting
            for cmd in ("qmp_capabilities", command):
                f.write(json.dumps({"execute": cmd}) + "\n")
                f.flush()
                while True:
                    reply: dict[str, object] = json.loads(f.readline())
                    if "return" in reply or "error" in reply:
                        break
                if "error" in reply:
                    raise VmError(f"QMP {cmd}: {reply['error']}")
            return reply

    def powerdown(self) -> None:
        """The ACPI power button."""
        self.qmp("system_powerdown")

    def reset(self) -> None:
        """A hard reset: no shutdown in the guest."""
        self.qmp("system_reset")

    # ------------------------------------------------------------- agent
    def _connect_agent(self) -> socket.socket:
        if self._agent is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(self.dir / "agent.sock"))
            self._agent = s
            self._buf = ""
        return self._agent

    def _close_agent(self) -> None:
        if self._agent is not None:
            with contextlib.suppress(OSError):
                self._agent.close()
            self._agent = None

    def _read_until(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str] | None:
        s = self._connect_agent()
        deadline = time.monotonic() + timeout
        while True:
            m = pattern.search(self._buf)
            if m:
                self._buf = self._buf[m.end() :]
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            s.settimeout(min(left, 1.0))
            try:
                data = s.recv(65536)
            except TimeoutError:
                continue
            if not data:
                self._close_agent()
                raise VmError("agent socket closed by qemu")
            self._buf += data.decode(errors="replace")

    def _send(self, line: str) -> None:
        self._connect_agent().sendall(line.encode())

    def wait_agent(self, timeout: float) -> float:
        """Wait until the guest's agent answers; returns the seconds waited."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            tok = secrets.token_hex(4)
            self._send(f"echo __TSE_READY_{tok}\n")
            if self._read_until(re.compile(rf"__TSE_READY_{tok}\n"), 3):
                return time.monotonic() - t0
        raise VmError(
            f"{self.spec.name}: the guest agent did not answer in {timeout:.0f}s; console:\n{self.console_tail()}"
        )

    def sh(self, script: str, timeout: float = 60, check: bool = True) -> Result:
        """Run `script` with bash in the guest as root; its output and exit code."""
        tok = secrets.token_hex(6)
        b64 = base64.b64encode(script.encode()).decode()
        self._send(f'bash -c "$(echo {b64} | base64 -d)" </dev/null 2>&1; rc=$?; echo; echo "__TSE_DONE_{tok}_$rc"\n')
        m = self._read_until(re.compile(rf"(?s)(.*?)\n?__TSE_DONE_{tok}_(\d+)\n"), timeout)
        if m is None:
            raise VmError(f"{self.spec.name}: no answer in {timeout:.0f}s to: {script}")
        out = m.group(1)
        # The echo before the marker adds one newline.
        out = out[:-1] if out.endswith("\n") else out
        result = Result(int(m.group(2)), out)
        if check and result.rc != 0:
            raise VmError(f"{self.spec.name}: `{script}` -> rc={result.rc}\n{result.out}")
        return result

    def send_only(self, script: str) -> None:
        """Start `script` in the guest without waiting (e.g. a reboot)."""
        b64 = base64.b64encode(script.encode()).decode()
        self._send(f'bash -c "$(echo {b64} | base64 -d)" </dev/null >/dev/null 2>&1 &\n')

    def forget_agent_output(self) -> None:
        """After a reboot: drop what the old boot's shell left unread."""
        self._buf = ""

    def console_tail(self, n: int = 60) -> str:
        try:
            lines = self.console_log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def disk_contains(self, needle: bytes) -> bool:
        """Whether the guest's whole disk, as the guest sees it (overlay and
        base image: every block, used or free), contains `needle`."""
        raw = self.dir / "disk-view.raw"
        subprocess.run(
            ["qemu-img", "convert", "-O", "raw", str(self.disk), str(raw)], check=True, capture_output=True, timeout=600
        )
        try:
            found = subprocess.run(
                ["grep", "-c", "-a", "-F", needle.decode()], stdin=raw.open("rb"), capture_output=True
            )
            return found.returncode == 0
        finally:
            raw.unlink()


def tap_up(netns: str, tap: str, address: str) -> None:
    """A persistent tap device in `netns` with `address` (CIDR) on it."""
    for args in (
        ["ip", "tuntap", "add", "dev", tap, "mode", "tap"],
        ["ip", "addr", "add", address, "dev", tap],
        ["ip", "link", "set", tap, "up"],
    ):
        subprocess.run(["ip", "netns", "exec", netns, *args], check=True, capture_output=True, timeout=30)
