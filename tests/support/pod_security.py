"""Pod Security Standards, `restricted` level (which includes `baseline`), as
kubernetes/pod-security-admission's policy/check_*.go implement them for the
latest version. `violations()` returns one message per failed check; an empty
list means the pod would be admitted into a namespace enforcing `restricted`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from tests.support.kube import containers

Manifest = dict[str, Any]

# check_sysctls.go: the safe set.
SAFE_SYSCTLS: Final = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
# check_restrictedVolumes.go
RESTRICTED_VOLUME_TYPES: Final = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
)
# check_seLinuxOptions.go
SELINUX_TYPES: Final = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
APPARMOR_ANNOTATION: Final = "container.apparmor.security.beta.kubernetes.io/"


def _sc(obj: Manifest) -> Manifest:
    return obj.get("securityContext") or {}


def host_namespaces(meta: Manifest, spec: Manifest) -> list[str]:
    return [f"{k}=true" for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]


def privileged(meta: Manifest, spec: Manifest) -> list[str]:
    return [f"container {c['name']} privileged" for c in containers(spec) if _sc(c).get("privileged")]


def host_ports(meta: Manifest, spec: Manifest) -> list[str]:
    return [
        f"container {c['name']} hostPort {p['hostPort']}"
        for c in containers(spec)
        for p in c.get("ports") or []
        if p.get("hostPort")
    ]


def host_path_volumes(meta: Manifest, spec: Manifest) -> list[str]:
    return [f"volume {v['name']} is hostPath" for v in spec.get("volumes") or [] if "hostPath" in v]


def app_armor(meta: Manifest, spec: Manifest) -> list[str]:
    found = [
        f"annotation {k}={v}"
        for k, v in (meta.get("annotations") or {}).items()
        if k.startswith(APPARMOR_ANNOTATION) and v != "runtime/default" and not v.startswith("localhost/")
    ]
    for where, sc in [("pod", _sc(spec)), *((f"container {c['name']}", _sc(c)) for c in containers(spec))]:
        profile = sc.get("appArmorProfile")
        if profile and profile.get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{where} appArmorProfile {profile.get('type')}")
    return found


def se_linux(meta: Manifest, spec: Manifest) -> list[str]:
    found = []
    for where, sc in [("pod", _sc(spec)), *((f"container {c['name']}", _sc(c)) for c in containers(spec))]:
        options = sc.get("seLinuxOptions") or {}
        if options.get("type", "") not in SELINUX_TYPES or options.get("user") or options.get("role"):
            found.append(f"{where} seLinuxOptions {options}")
    return found


def proc_mount(meta: Manifest, spec: Manifest) -> list[str]:
    return [
        f"container {c['name']} procMount {_sc(c)['procMount']}"
        for c in containers(spec)
        if _sc(c).get("procMount") not in (None, "Default")
    ]


def sysctls(meta: Manifest, spec: Manifest) -> list[str]:
    return [f"sysctl {s['name']}" for s in _sc(spec).get("sysctls") or [] if s["name"] not in SAFE_SYSCTLS]


def windows_host_process(meta: Manifest, spec: Manifest) -> list[str]:
    scs = [_sc(spec), *(_sc(c) for c in containers(spec))]
    return ["hostProcess" for sc in scs if (sc.get("windowsOptions") or {}).get("hostProcess")]


def volume_types(meta: Manifest, spec: Manifest) -> list[str]:
    return [
        f"volume {v['name']} of type {sorted(set(v) - {'name'})}"
        for v in spec.get("volumes") or []
        if not (set(v) - {"name"}) <= RESTRICTED_VOLUME_TYPES
    ]


def privilege_escalation(meta: Manifest, spec: Manifest) -> list[str]:
    return [
        f"container {c['name']} allowPrivilegeEscalation != false"
        for c in containers(spec)
        if _sc(c).get("allowPrivilegeEscalation") is not False
    ]


def run_as_non_root(meta: Manifest, spec: Manifest) -> list[str]:
    pod_level = _sc(spec).get("runAsNonRoot")
    found = ["pod runAsNonRoot=false"] if pod_level is False else []
    for c in containers(spec):
        container_level = _sc(c).get("runAsNonRoot")
        if container_level is False or (container_level is None and pod_level is not True):
            found.append(f"container {c['name']} may run as root (runAsNonRoot not true)")
    return found


def run_as_user(meta: Manifest, spec: Manifest) -> list[str]:
    scs = [("pod", _sc(spec)), *((f"container {c['name']}", _sc(c)) for c in containers(spec))]
    return [f"{where} runAsUser=0" for where, sc in scs if sc.get("runAsUser") == 0]


def seccomp(meta: Manifest, spec: Manifest) -> list[str]:
    allowed = ("RuntimeDefault", "Localhost")
    pod_type = (_sc(spec).get("seccompProfile") or {}).get("type")
    found = [f"pod seccompProfile {pod_type}"] if pod_type is not None and pod_type not in allowed else []
    for c in containers(spec):
        container_type = (_sc(c).get("seccompProfile") or {}).get("type")
        if container_type is not None and container_type not in allowed:
            found.append(f"container {c['name']} seccompProfile {container_type}")
        elif container_type is None and pod_type not in allowed:
            found.append(f"container {c['name']} has no RuntimeDefault/Localhost seccomp profile")
    return found


def capabilities(meta: Manifest, spec: Manifest) -> list[str]:
    found = []
    for c in containers(spec):
        caps = _sc(c).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            found.append(f"container {c['name']} does not drop ALL capabilities")
        found += [f"container {c['name']} adds {a}" for a in caps.get("add") or [] if a != "NET_BIND_SERVICE"]
    return found


CHECKS: Final[dict[str, Callable[[Manifest, Manifest], list[str]]]] = {
    # baseline
    "hostNamespaces": host_namespaces,
    "privileged": privileged,
    "hostPorts": host_ports,
    "hostPathVolumes": host_path_volumes,
    "appArmorProfile": app_armor,
    "seLinuxOptions": se_linux,
    "procMount": proc_mount,
    "sysctls": sysctls,
    "windowsHostProcess": windows_host_process,
    # restricted
    "restrictedVolumes": volume_types,
    "allowPrivilegeEscalation": privilege_escalation,
    "runAsNonRoot": run_as_non_root,
    "runAsUser": run_as_user,
    "seccompProfile_restricted": seccomp,
    "capabilities_restricted": capabilities,
}


def violations(template: Manifest) -> list[str]:
    """Every `restricted` violation of a Pod or pod template."""
    meta, spec = template.get("metadata") or {}, template["spec"]
    return [f"{name}: {message}" for name, check in CHECKS.items() for message in check(meta, spec)]
