"""A pod's or container's cgroup v1 directories on the cluster's node, as the
kubelet (cgroupfs driver, cgroupRoot CGROUP_ROOT) made them: what the relay
really runs with (its CPU quota, its memory, its processes), read from the
node rather than from the manifest. Used by the e2e suite and
`make bench-cluster`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.support.cluster_env import CGROUP_ROOT, Api

CGROUPS = Path("/sys/fs/cgroup")


class CgroupError(RuntimeError):
    pass


@dataclass(frozen=True)
class Cgroup:
    """The memory, cpuacct and cpu hierarchies' directories of one cgroup."""

    memory: Path
    cpuacct: Path
    cpu: Path

    @staticmethod
    def find(name: str) -> Cgroup:
        dirs = []
        for h in ("memory", "cpuacct", "cpu"):
            found = sorted((CGROUPS / h / CGROUP_ROOT).rglob(name))
            if not found:
                raise CgroupError(f"no cgroup {name} under {CGROUPS / h / CGROUP_ROOT}")
            dirs.append(found[0])
        return Cgroup(*dirs)

    def _int(self, d: Path, name: str) -> int:
        return int((d / name).read_text().split()[0])

    def _stat(self, d: Path, name: str) -> dict[str, int]:
        return {k: int(v) for k, v in (ln.split() for ln in (d / name).read_text().splitlines())}

    def working_set(self) -> int:
        """usage minus inactive file pages: the kubelet's working set."""
        usage = self._int(self.memory, "memory.usage_in_bytes")
        return max(0, usage - self._stat(self.memory, "memory.stat").get("total_inactive_file", 0))

    def rss(self) -> int:
        return self._stat(self.memory, "memory.stat").get("total_rss", 0)

    def peak(self) -> int:
        return self._int(self.memory, "memory.max_usage_in_bytes")

    def reset_peak(self) -> None:
        (self.memory / "memory.max_usage_in_bytes").write_text("0")

    def limit(self) -> int:
        return self._int(self.memory, "memory.limit_in_bytes")

    def cpu_limit(self) -> float | None:
        """CPUs the CFS quota allows (what Go sizes GOMAXPROCS from); None: no quota."""
        quota = self._int(self.cpu, "cpu.cfs_quota_us")
        return None if quota < 0 else quota / self._int(self.cpu, "cpu.cfs_period_us")

    def cpu_seconds(self) -> float:
        return self._int(self.cpuacct, "cpuacct.usage") / 1e9

    def throttled_seconds(self) -> float:
        return self._stat(self.cpu, "cpu.stat").get("throttled_time", 0) / 1e9

    def pids(self) -> list[int]:
        return [int(p) for p in (self.memory / "cgroup.procs").read_text().split()]

    def pid(self) -> int:
        """A process of it: the way into its network namespace (/proc/<pid>/net)."""
        return self.pids()[0]

    def process(self, command: str) -> int:
        """The pid of its process whose command name is `command`."""
        for pid in self.pids():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == command:
                    return pid
            except OSError:
                continue
        raise CgroupError(f"no process {command!r} in {self.memory}")


def environment(pid: int) -> dict[str, str]:
    """A process's environment as it was started (/proc/<pid>/environ)."""
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(e.split("=", 1) for e in entries if "=" in e)


def pod_cgroup(api: Api, ns: str, name: str, container: str | None = None) -> Cgroup:
    """The cgroup of a pod, or of one of its running containers."""
    pod = api.get("v1", "Pod", name, ns)
    if pod is None:
        raise CgroupError(f"no pod {ns}/{name}")
    if container is None:
        return Cgroup.find(f"pod{pod['metadata']['uid']}")
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs["name"] == container and cs.get("containerID"):
            return Cgroup.find(cs["containerID"].split("://", 1)[1])
    raise CgroupError(f"no running container {container} in {ns}/{name}")
