"""Stack configuration: one pydantic model, validated as a whole before any
resource exists. Every problem is reported at once, each naming its key, the
bad value and what is allowed."""

from __future__ import annotations

import difflib
import ipaddress
import re
import types
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Final, get_args
from urllib.parse import urlsplit

import pulumi
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic.alias_generators import to_camel

from builders.networks import is_public, is_tailnet_ip
from builders.node_guard import guard_namespace

PROJECT: Final = "tailscale-egress"
RELAY_IMAGE: Final = "ghcr.io/tailscale/tailscale:v1.102.5"

HETZNER_LOCATIONS: Final = ("fsn1", "nbg1", "hel1", "ash", "hil", "sin")
HETZNER_SERVER_TYPES: Final = (
    "cx23", "cx33", "cx43", "cx53",
    "cpx12", "cpx22", "cpx32", "cpx42", "cpx52", "cpx62",
    "cax11", "cax21", "cax31", "cax41",
    "ccx13", "ccx23", "ccx33", "ccx43", "ccx53", "ccx63",
)  # fmt: skip
# Images whose Tailscale apt repository we know: image -> (distro, codename).
EXIT_NODE_IMAGES: Final[dict[str, tuple[str, str]]] = {
    "ubuntu-24.04": ("ubuntu", "noble"),
    "ubuntu-22.04": ("ubuntu", "jammy"),
    "debian-12": ("debian", "bookworm"),
    "debian-13": ("debian", "trixie"),
}
SYSTEM_NAMESPACES: Final = frozenset({"kube-system", "kube-public", "kube-node-lease"})
RELAY_EGRESS_MODES: Final = ("pinned", "public")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_TAG = re.compile(r"^tag:[a-zA-Z][-a-zA-Z0-9]*$")
# An exact version: major.minor.patch, with an optional v and suffix (v1.102.5,
# 1.102.5-alpine). Tags such as stable, latest, v1 or 1.102 move to new images.
_EXACT_VERSION_TAG = re.compile(r"^v?\d+\.\d+\.\d+(?:[-+][\w.-]+)?$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class _Model(BaseModel):
    """camelCase keys in YAML, snake_case in Python; unknown keys are errors."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


def _network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as err:
        raise ValueError(f"must be a CIDR such as 203.0.113.7/32 or 2001:db8::/64 ({err})") from None


def _address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError("must be an IP address such as 203.0.113.7 or 2001:db8::1") from None


def _dns_label(value: str) -> str:
    """A Kubernetes namespace name: an RFC 1123 label."""
    if not _DNS_LABEL.match(value):
        raise ValueError("must be a DNS label: lower-case letters, digits and inner hyphens, at most 63")
    return value


def _one_of(allowed: Iterable[str], note: str = "") -> AfterValidator:
    choices = tuple(allowed)

    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}{note}")
        return value

    return AfterValidator(check)


def covers_whole_internet(cidr: str) -> bool:
    """True for a block larger than any one organisation's network: an IPv4
    prefix shorter than /8 or an IPv6 prefix shorter than /16 (0.0.0.0/0, ::/0,
    2000::/3...). A firewall rule from such a block is open to the world."""
    network = ipaddress.ip_network(cidr, strict=False)
    return network.prefixlen < (8 if network.version == 4 else 16)


def unpinned_image_problem(image: str) -> str | None:
    """Why `image` is not pinned to an exact version tag or a digest, or None when it is."""
    name, _, digest = image.partition("@")
    repository, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "")
    pinned_by_digest = bool(_DIGEST.match(digest))
    pinned_by_tag = len(tag) <= 128 and bool(_EXACT_VERSION_TAG.match(tag))
    if " " in image or not repository or (digest and not pinned_by_digest) or not (pinned_by_digest or pinned_by_tag):
        moving = ""
        if repository and not digest:
            moving = f" (the tag {tag!r} can move to another image)" if tag else " (no tag means :latest, which moves)"
        return (
            f"must be pinned to an exact version or a digest{moving}, such as {RELAY_IMAGE}"
            f" or {RELAY_IMAGE.partition(':')[0]}@sha256:<64 hex digits>"
        )
    return None


class ExitNodeConfig(_Model):
    location: Annotated[str, _one_of(HETZNER_LOCATIONS)] = "fsn1"
    server_type: Annotated[str, _one_of(HETZNER_SERVER_TYPES, " (cx22 and cpx11 are retired)")] = "cx23"
    image: Annotated[str, _one_of(EXIT_NODE_IMAGES)] = "debian-12"
    # Before ssh_allowed_cidrs, whose check reads it.
    ssh_allow_whole_internet: bool = False
    ssh_allowed_cidrs: list[str] = Field(default_factory=list)
    # Bring your own exit node: no Hetzner resource is created.
    existing_tailnet_ip: str | None = None
    existing_public_ips: list[str] = Field(default_factory=list)

    @field_validator("ssh_allowed_cidrs")
    @classmethod
    def _ssh(cls, v: list[str], info: ValidationInfo) -> list[str]:
        out = [_network(c) for c in v]
        wide = [c for c in out if covers_whole_internet(c)]
        if wide and info.data.get("ssh_allow_whole_internet") is not True:
            raise ValueError(
                f"{', '.join(wide)} opens SSH to the whole internet (an IPv4 prefix shorter than /8 or an IPv6"
                " prefix shorter than /16 counts as that); list your own addresses, such as 203.0.113.7/32,"
                " or set exitNode.sshAllowWholeInternet: true to accept it"
            )
        return out

    @field_validator("existing_tailnet_ip")
    @classmethod
    def _tailnet_ip(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = _address(v)
        if not is_tailnet_ip(v):
            raise ValueError("must be a tailnet address (in 100.64.0.0/10 or fd7a:115c:a1e0::/48)")
        return v

    @field_validator("existing_public_ips")
    @classmethod
    def _public_ips(cls, v: list[str]) -> list[str]:
        out = [_address(a) for a in v]
        for a in out:
            if not is_public(a):
                raise ValueError(f"{a} is not a public address; list the exit node's public IPs")
        return out

    @property
    def managed(self) -> bool:
        """True when the stack creates the exit node on Hetzner."""
        return self.existing_tailnet_ip is None


class TailnetConfig(_Model):
    exit_node_tag: str = "tag:egress-exit"
    relay_tag: str = "tag:egress-relay"
    manage_policy: bool = False
    login_server: str | None = None
    control_plane_cidrs: list[str] = Field(default_factory=list)
    # pinned: the relay reaches the exit node and the control plane only;
    # public: any public address too (a direct dial then leaves the cluster).
    relay_egress: Annotated[str, _one_of(RELAY_EGRESS_MODES)] = "pinned"
    exit_node_key_expiry_seconds: int = Field(default=3600, ge=300, le=86400)
    # The relay's reusable key: renewed by `pulumi up` once half of this has passed.
    relay_key_expiry_hours: int = Field(default=168, ge=2, le=2160)

    @field_validator("exit_node_tag", "relay_tag")
    @classmethod
    def _tag(cls, v: str) -> str:
        if not _TAG.match(v):
            raise ValueError('must look like "tag:name": the "tag:" prefix, then a letter, letters, digits or hyphens')
        return v

    @field_validator("login_server")
    @classmethod
    def _login_server(cls, v: str | None) -> str | None:
        if v is None:
            return None
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError("must be the control server's base URL, such as https://headscale.example.com")
        return v.rstrip("/")

    @field_validator("control_plane_cidrs")
    @classmethod
    def _control_cidrs(cls, v: list[str]) -> list[str]:
        out = [_network(c) for c in v]
        for c in out:
            if not is_public(c):
                raise ValueError(f"{c} is not public address space")
        return out

    @property
    def login_server_address(self) -> tuple[str, int] | None:
        """The login server's IP and port when its URL names an IP literal."""
        if self.login_server is None:
            return None
        parts = urlsplit(self.login_server)
        try:
            ip = str(ipaddress.ip_address(parts.hostname or ""))
        except ValueError:
            return None
        return ip, parts.port or (443 if parts.scheme == "https" else 80)


class ProtectedNamespaceConfig(_Model):
    name: str
    # False: the namespace exists already and is only labelled (and unlabelled
    # on destroy). True: the stack creates it (and deletes it on destroy).
    create: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        v = _dns_label(v)
        if v in SYSTEM_NAMESPACES:
            raise ValueError("system namespaces are never protected (the cluster itself needs them)")
        return v


class ClusterConfig(_Model):
    context: str = "rancher-desktop"
    kubeconfig: str | None = None
    relay_namespace: str = "tailscale-egress"
    protected_namespaces: list[ProtectedNamespaceConfig] = Field(
        default_factory=lambda: [ProtectedNamespaceConfig(name="default")]
    )
    relay_image: str = RELAY_IMAGE
    relay_replicas: int = Field(default=1, ge=1, le=5)
    pod_cidr: str = "10.42.0.0/16"
    service_cidr: str = "10.43.0.0/16"
    cluster_domain: str = "cluster.local"
    # ValidatingAdmissionPolicies that keep the protected namespaces' egress,
    # the stack's objects and the Pod Security labels as the stack set them.
    admission_guard: bool = True
    # The Kubernetes user the stack deploys as, the only one the guard lets
    # change the stack's objects; None asks the API server (kubectl auth whoami).
    deployer: str | None = None
    # The node guard DaemonSet: drops pod ICMP leaving the cluster or going to
    # unused cluster addresses, pod traffic to the node's NodePorts, and pod
    # IPv6 (fe80::) that no policy sees.
    node_guard: bool = True
    # Namespaces whose pods may open connections to pods of the protected
    # namespaces (an ingress controller's, say); none by default: ingress to a
    # protected namespace is from its own pods only, and its Services are
    # ClusterIP without externalIPs (both enforced by the admission guard).
    ingress_from: list[Annotated[str, AfterValidator(_dns_label)]] = Field(default_factory=list)

    @field_validator("protected_namespaces", mode="before")
    @classmethod
    def _plain_names(cls, v: Any) -> Any:
        # Plain names are accepted and mean "label this existing namespace".
        if isinstance(v, list):
            return [{"name": item} if isinstance(item, str) else item for item in v]
        return v

    @field_validator("relay_image")
    @classmethod
    def _pinned(cls, v: str) -> str:
        problem = unpinned_image_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @field_validator("pod_cidr", "service_cidr")
    @classmethod
    def _cidr(cls, v: str) -> str:
        return _network(v)

    @field_validator("relay_namespace")
    @classmethod
    def _relay_ns(cls, v: str) -> str:
        v = _dns_label(v)
        if v in SYSTEM_NAMESPACES or v == "default":
            raise ValueError("must be a namespace of its own, not a system namespace or default")
        return v

    @field_validator("deployer")
    @classmethod
    def _deployer(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or v != v.strip()):
            raise ValueError("must be a Kubernetes username as `kubectl auth whoami` prints it, or null to ask it")
        return v


class StackConfig(_Model):
    """The whole configuration. Use `parse_config`, which also checks the sections against each other."""

    exit_node: ExitNodeConfig = Field(default_factory=ExitNodeConfig)
    tailnet: TailnetConfig = Field(default_factory=TailnetConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)


class ConfigError(pulumi.RunError):
    """Bad configuration; the message lists every problem, one a line."""


def _key_of(loc: tuple[int | str, ...]) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _value_at(raw: Mapping[str, Any], loc: tuple[int | str, ...]) -> Any:
    node: Any = raw
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _cross_section_problems(raw: Mapping[str, Any]) -> list[str]:
    """Problems between keys; read from the raw values so that they are
    reported together with the problems of single keys."""
    exit_node, tailnet, cluster = (raw.get(s) or {} for s in ("exitNode", "tailnet", "cluster"))
    if not all(isinstance(x, Mapping) for x in (exit_node, tailnet, cluster)):
        return []
    problems: list[str] = []
    relay_ns = cluster.get("relayNamespace", "tailscale-egress")
    names = [
        n if isinstance(n, str) else (n or {}).get("name")
        for n in cluster.get("protectedNamespaces", ["default"]) or []
    ]
    if "protectedNamespaces" in cluster and not names:
        problems.append("cluster.protectedNamespaces = []: list at least one namespace, such as [default]")
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name == relay_ns:
            problems.append(
                f"cluster.protectedNamespaces[{i}] = {name!r}: is the relay's own namespace (cluster.relayNamespace)"
            )
        elif name in seen:
            problems.append(f"cluster.protectedNamespaces[{i}] = {name!r}: listed twice")
        if isinstance(name, str):
            seen.add(name)
    if cluster.get("nodeGuard", True) is True and isinstance(relay_ns, str):
        guard_ns = guard_namespace(relay_ns)
        if len(guard_ns) > 63:
            problems.append(
                f"cluster.relayNamespace = {relay_ns!r}: at most 52 characters while cluster.nodeGuard is on"
                f" (the node guard's namespace is <relayNamespace>-node-guard); shorten it"
            )
        for i, name in enumerate(names):
            if name == guard_ns:
                problems.append(
                    f"cluster.protectedNamespaces[{i}] = {name!r}: is the node guard's own namespace"
                    " (<relayNamespace>-node-guard, Pod Security privileged); protect another namespace"
                )
    exit_tag = tailnet.get("exitNodeTag", "tag:egress-exit")
    if tailnet.get("relayTag", "tag:egress-relay") == exit_tag:
        problems.append(
            f"tailnet.relayTag = {exit_tag!r}: must differ from tailnet.exitNodeTag"
            " (the relay must never be able to act as the exit node)"
        )
    byo = exit_node.get("existingTailnetIp") is not None
    if tailnet.get("loginServer") is not None:
        if not byo:
            problems.append(
                "exitNode.existingTailnetIp = None: required with tailnet.loginServer (the stack cannot read a new"
                " exit node's tailnet IP from a self-hosted control server); set it to your exit node's tailnet IP"
            )
        if tailnet.get("managePolicy"):
            problems.append(
                "tailnet.managePolicy = True: not possible with tailnet.loginServer (manage a self-hosted"
                " control server's policy there); set it to false"
            )
    if byo and exit_node.get("sshAllowedCidrs"):
        problems.append(
            f"exitNode.sshAllowedCidrs = {exit_node['sshAllowedCidrs']!r}: only applies to an exit node the stack"
            " creates; remove it, or unset exitNode.existingTailnetIp"
        )
    if tailnet.get("relayEgress", "pinned") == "pinned":
        problems += _pinned_egress_problems(exit_node, tailnet, byo)
    if not byo and exit_node.get("existingPublicIps"):
        problems.append(
            f"exitNode.existingPublicIps = {exit_node['existingPublicIps']!r}: only applies with"
            " exitNode.existingTailnetIp (the stack knows the public IPs of an exit node it creates)"
        )
    return problems


def _pinned_egress_problems(exit_node: Mapping[str, Any], tailnet: Mapping[str, Any], byo: bool) -> list[str]:
    """Pinned relay egress (the default) needs every address the relay uses;
    refused rather than silently opened to the public internet."""
    problems: list[str] = []
    opt_out = "or set tailnet.relayEgress to public (the relay may then reach any public address)"
    if byo and not exit_node.get("existingPublicIps"):
        problems.append(
            f"exitNode.existingPublicIps = {exit_node.get('existingPublicIps', [])!r}: required with"
            " exitNode.existingTailnetIp while tailnet.relayEgress is pinned (the default): list your exit"
            f" node's public IPs, the only addresses the relay may send WireGuard to; {opt_out}"
        )
    login = tailnet.get("loginServer")
    if isinstance(login, str) and not tailnet.get("controlPlaneCidrs") and not _names_an_ip(login):
        problems.append(
            f"tailnet.controlPlaneCidrs = {tailnet.get('controlPlaneCidrs', [])!r}: required with"
            f" tailnet.loginServer = {login!r} (a host name) while tailnet.relayEgress is pinned (the default):"
            f" list the control server's addresses, or give tailnet.loginServer as an IP; {opt_out}"
        )
    return problems


def _names_an_ip(url: str) -> bool:
    try:
        ipaddress.ip_address(urlsplit(url).hostname or "")
    except ValueError:
        return False
    return True


# Keys of the project's namespace read outside StackConfig (components/tailnet_access.py).
OTHER_KEYS: Final = ("relayAuthKey",)
# Namespaces of the providers and of Pulumi itself: their keys are theirs to check.
OTHER_NAMESPACES: Final = frozenset({"hcloud", "tailscale", "kubernetes", "pulumi"})


def _aliases(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _closest(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to `name` (case-insensitively), if any is close."""
    by_lower = {k.lower(): k for k in known}
    found = difflib.get_close_matches(name.lower(), list(by_lower), n=1)
    return by_lower[found[0]] if found else None


def _keys_at(loc: tuple[int | str, ...]) -> list[str]:
    """The keys the model knows inside the map at `loc` (list indexes skipped)."""
    model: type[BaseModel] = StackConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        if field is None:
            return []
        candidates = (field.annotation, *get_args(field.annotation))
        models = [
            c
            for c in candidates
            if isinstance(c, type) and not isinstance(c, types.GenericAlias) and issubclass(c, BaseModel)
        ]
        if not models:
            return []
        model = models[0]
    return _aliases(model)


def unknown_key_problems(keys: Iterable[str]) -> list[str]:
    """One line per stack config key this program does not know: a key of its
    namespace it does not read, or a namespace that is a near miss of its own
    (`tailscale_egress:`); keys of other namespaces are left to their owners."""
    known = [*_aliases(StackConfig), *OTHER_KEYS]
    problems = []
    for full in sorted(keys):
        namespace, sep, key = full.partition(":")
        if not sep or namespace in OTHER_NAMESPACES:
            continue
        if namespace == PROJECT:
            if key in known:
                continue
            section = key.split(".", 1)[0]
            if "." in key and section in known:
                # `pulumi config set exitNode.location hel1` stores the literal key "exitNode.location".
                problems.append(
                    f"{full}: a nested key needs --path; remove this one and set it again with:"
                    f" pulumi config rm '{key}' && pulumi config set --path '{key}' <value>"
                )
                continue
            guess = _closest(key, known)
            hint = f"did you mean {PROJECT}:{guess}?" if guess else f"the keys are {', '.join(known)}"
            problems.append(f"{full}: unknown key; {hint} (see docs/configuration.md)")
        elif difflib.get_close_matches(namespace.lower(), [PROJECT], n=1, cutoff=0.8):
            guess = key if key in known else _closest(key, known) or key
            problems.append(
                f"{full}: unknown namespace {namespace!r}; did you mean {PROJECT}:{guess}?"
                f" (this program reads only {PROJECT}:<key>)"
            )
    return problems


# How a list key looks, for the message when a single value is given instead.
_LIST_EXAMPLES: Final = {
    "protectedNamespaces": "[default, team-a]",
    "sshAllowedCidrs": "[203.0.113.7/32]",
    "existingPublicIps": "[203.0.113.10]",
    "controlPlaneCidrs": "[198.51.100.0/24]",
}


def parse_config(raw: Mapping[str, Any], also: Iterable[str] = ()) -> StackConfig:
    """Validate `raw` ({"exitNode": {...}, "tailnet": {...}, "cluster": {...}}).

    Raises ConfigError listing every problem (`also` first) as
    `tailscale-egress:<key> = <value>: <what is allowed>`.
    """
    lines: list[str] = list(also)
    try:
        model = StackConfig.model_validate(raw)
    except ValidationError as err:
        for e in err.errors():
            loc = tuple(p for p in e["loc"] if p not in ("function-after", "function-before"))
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "list_type":
                example = _LIST_EXAMPLES.get(str(loc[-1]), "[a, b]")
                msg = f"must be a list, such as {example} (in YAML: [a, b], or one '- item' a line)"
            if e["type"] == "extra_forbidden":
                guess = _closest(str(loc[-1]), _keys_at(loc[:-1]))
                hint = f"did you mean {_key_of((*loc[:-1], guess))}? " if guess else ""
                msg = f"unknown key; {hint}(see docs/configuration.md for the keys there are)"
            if loc[-1] == "name" and isinstance(_value_at(raw, loc[:-1]), str):
                loc = loc[:-1]  # a plain namespace name: report it as written
            value = _value_at(raw, loc) if e["type"] != "missing" else None
            lines.append(f"{PROJECT}:{_key_of(loc)} = {value!r}: {msg}")
    lines += [f"{PROJECT}:{p}" for p in _cross_section_problems(raw)]
    if lines:
        raise ConfigError("invalid stack configuration:\n  " + "\n  ".join(lines))
    return model


def check_config(config: Mapping[str, Any]) -> StackConfig:
    """Validate a whole stack configuration, {"<namespace>:<key>": value}, with
    the sections' values as objects: unknown keys and bad values, all at once."""
    problems = unknown_key_problems(config)
    raw: dict[str, Any] = {}
    for section in _aliases(StackConfig):
        value = config.get(f"{PROJECT}:{section}")
        if value is not None and not isinstance(value, dict):
            problems.append(f"{PROJECT}:{section} = {value!r}: must be an object of keys (see Pulumi.dev.yaml)")
        elif value is not None:
            raw[section] = value
    return parse_config(raw, also=problems)


def _stack_config_keys() -> set[str]:
    """Every key of the stack's config, as the language host hands it over."""
    return set(pulumi.runtime.config.CONFIG.get()) | set(pulumi.runtime.config.get_config_env())


def load_config() -> StackConfig:
    """Read and check the stack's config: `tailscale-egress:{exitNode,tailnet,cluster}`,
    and the names of all other keys, so that a misspelt one is not ignored."""
    cfg = pulumi.Config(PROJECT)
    config: dict[str, Any] = dict.fromkeys(_stack_config_keys())  # other values are not read here
    for section in _aliases(StackConfig):
        try:
            value = cfg.get_object(section)
        except Exception:  # noqa: BLE001  (Pulumi raises a plain error for a value that is not JSON)
            value = cfg.get(section)
        config[f"{PROJECT}:{section}"] = value
    return check_config(config)
