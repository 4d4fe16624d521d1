"""An emulated Hetzner Cloud API on loopback, for the real hcloud provider (issue 18).

It serves what `terraform-provider-hcloud` (bridged as `pulumi-resource-hcloud`)
calls for a Firewall and a Server: firewalls and their actions, servers and
their power and type actions, server types, images and locations looked up by
name, and actions and their polling. State lives in memory, one Hetzner project
per `HetznerAPI`. Status codes and error bodies follow Hetzner's API
documentation (`{"error": {"code": ..., "message": ..., "details": ...}}`), and
it keeps the rules the stack depends on:

- names are unique per project (409 `uniqueness_error`), server names are
  hostnames, labels follow Hetzner's label syntax (400 `invalid_input`);
- `user_data` is at most 32 KiB;
- a server type is sold only in the locations of the catalogue (400
  `invalid_input`, "unsupported location for server type", as Hetzner answers);
- a token is unknown (401 `unauthorized`), read-only (403 `token_readonly` on
  anything but GET) or read-write;
- a running server cannot change type (`server_not_stopped`), a firewall still
  applied to a server cannot be deleted (`resource_in_use`);
- `fail(...)` makes chosen calls fail (500/503), to break an `up` midway.

Creating a server calls `hooks.on_server_created(server, user_data)`; the ACPI
`shutdown` and the hard `poweroff` call `hooks.on_server_shutdown(server,
command)`, and a delete `hooks.on_server_deleted(server)`: a later step boots
and stops a real VM there. `RecordingHooks`, the default, only records.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from tests.support.loopback_api import LoopbackAPI, Reply, Request

Scope = Literal["read", "read_write"]
Json = dict[str, Any]

# Hetzner's documented limit on user_data ("limited to 32KiB").
USER_DATA_LIMIT = 32 * 1024
API_PREFIX = "/v1"


@dataclass(frozen=True)
class Location:
    id: int
    name: str
    city: str
    country: str
    network_zone: str


@dataclass(frozen=True)
class ServerType:
    id: int
    name: str
    architecture: Literal["x86", "arm"]
    cores: int
    memory: float
    disk: int
    locations: tuple[str, ...]


@dataclass(frozen=True)
class Catalogue:
    locations: tuple[Location, ...]
    server_types: tuple[ServerType, ...]
    # Official images: one per name and architecture, as Hetzner lists them.
    images: tuple[str, ...]

    def location(self, name: str) -> Location | None:
        return next((loc for loc in self.locations if loc.name == name), None)

    def server_type(self, name_or_id: str) -> ServerType | None:
        return next((t for t in self.server_types if name_or_id in (t.name, str(t.id))), None)


_EU = ("fsn1", "nbg1", "hel1")
_ALL = (*_EU, "ash", "hil", "sin")

# What the tests need of Hetzner's catalogue: the cost-optimised x86 (cx) and
# Arm (cax) types only in Europe, as Hetzner sells them; the others everywhere.
CATALOGUE = Catalogue(
    locations=(
        Location(1, "fsn1", "Falkenstein", "DE", "eu-central"),
        Location(2, "nbg1", "Nuremberg", "DE", "eu-central"),
        Location(3, "hel1", "Helsinki", "FI", "eu-central"),
        Location(4, "ash", "Ashburn, VA", "US", "us-east"),
        Location(5, "hil", "Hillsboro, OR", "US", "us-west"),
        Location(6, "sin", "Singapore", "SG", "ap-southeast"),
    ),
    server_types=(
        ServerType(101, "cx23", "x86", 2, 4.0, 40, _EU),
        ServerType(102, "cx33", "x86", 4, 8.0, 80, _EU),
        ServerType(111, "cpx12", "x86", 1, 2.0, 40, _ALL),
        ServerType(112, "cpx22", "x86", 2, 4.0, 80, _ALL),
        ServerType(121, "cax11", "arm", 2, 4.0, 40, _EU),
        ServerType(122, "cax21", "arm", 4, 8.0, 80, _EU),
        ServerType(131, "ccx13", "x86", 2, 8.0, 80, _ALL),
    ),
    images=("debian-12", "debian-13", "ubuntu-22.04", "ubuntu-24.04"),
)


@dataclass(frozen=True)
class PublicNet:
    """A server's public addresses: its IPv4 address and its IPv6 /64."""

    ipv4: str
    ipv6: str


class ServerHooks(Protocol):
    """What happens to the machine behind a server. Called with the API's lock
    held and before the answer is sent, as Hetzner answers once the action is
    accepted: a hook that boots or stops a real VM starts it and returns (the
    provider polls the action, not the VM). The server is "off" once
    `on_server_shutdown` returns. A machine with addresses of its own (a
    VM's) gives them back from `on_server_created`, and the server has them."""

    def on_server_created(self, server: Json, user_data: str) -> PublicNet | None: ...

    def on_server_shutdown(self, server: Json, command: Literal["shutdown", "poweroff"]) -> None: ...

    def on_server_deleted(self, server: Json) -> None: ...


@dataclass
class RecordingHooks:
    """The default hooks: remember what happened to which server, in order."""

    events: list[tuple[str, str]] = field(default_factory=list)
    user_data: dict[str, str] = field(default_factory=dict)

    def on_server_created(self, server: Json, user_data: str) -> PublicNet | None:
        self.events.append(("created", server["name"]))
        self.user_data[server["name"]] = user_data
        return None

    def on_server_shutdown(self, server: Json, command: Literal["shutdown", "poweroff"]) -> None:
        self.events.append((command, server["name"]))

    def on_server_deleted(self, server: Json) -> None:
        self.events.append(("deleted", server["name"]))


class ApiError(Exception):
    """An error answer, as Hetzner writes it."""

    def __init__(self, status: int, code: str, message: str, details: Json | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details or {}

    def body(self) -> Json:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


def _invalid(field_name: str, message: str) -> ApiError:
    details = {"fields": [{"name": field_name, "messages": [message]}]}
    return ApiError(400, "invalid_input", f"invalid input in field '{field_name}'", details)


def _not_found(kind: str, ident: object) -> ApiError:
    return ApiError(404, "not_found", f"{kind} with ID '{ident}' not found")


# Hetzner's label syntax: keys are an optional DNS-subdomain prefix and a name,
# values a name or empty; names are at most 63 characters, alphanumeric at
# both ends, with "-", "_" and "." inside.
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def label_problem(key: str, value: str) -> str | None:
    """Why `key: value` is not a valid Hetzner label, or None."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _LABEL_PREFIX.match(prefix)):
        return f"label key {key!r}: the prefix must be a DNS subdomain"
    if not _LABEL_NAME.match(name):
        return f"label key {key!r}: at most 63 characters, alphanumeric at both ends, '-', '_' or '.' inside"
    if value and not _LABEL_NAME.match(value):
        return f"label value {value!r}: at most 63 characters, alphanumeric at both ends, '-', '_' or '.' inside"
    return None


def _check_labels(labels: object) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise _invalid("labels", "labels must be an object of strings")
    for key, value in labels.items():
        problem = label_problem(key, value)
        if problem:
            raise _invalid("labels", problem)
    return dict(labels)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def _pagination(count: int) -> Json:
    return {
        "pagination": {"page": 1, "per_page": max(count, 25), "previous_page": None, "next_page": None,
                       "last_page": 1, "total_entries": count}
    }  # fmt: skip


class HetznerAPI(LoopbackAPI):
    """One emulated Hetzner project, served on 127.0.0.1 while `running()`."""

    prefix = API_PREFIX

    def __init__(
        self,
        tokens: Mapping[str, Scope],
        catalogue: Catalogue = CATALOGUE,
        hooks: ServerHooks | None = None,
    ) -> None:
        super().__init__()
        self.tokens = dict(tokens)
        self.catalogue = catalogue
        self.hooks: ServerHooks = hooks if hooks is not None else RecordingHooks()
        self.firewalls: dict[int, Json] = {}
        self.servers: dict[int, Json] = {}
        self.actions: dict[int, Json] = {}
        self._user_data: dict[int, str] = {}
        self._next_id = 1000

    @property
    def endpoint(self) -> str:
        """The value for `hcloud:endpoint`."""
        return self.origin + API_PREFIX

    def user_data(self, server_name: str) -> str:
        """The user_data a live server was created with."""
        with self._lock:
            for server_id, server in self.servers.items():
                if server["name"] == server_name:
                    return self._user_data[server_id]
        raise KeyError(server_name)

    # ---- HTTP ----------------------------------------------------------

    def handle(self, request: Request) -> Reply:
        try:
            body: Json = {}
            if request.raw:
                try:
                    parsed = json.loads(request.raw)
                except json.JSONDecodeError as exc:
                    raise ApiError(400, "json_error", f"invalid JSON: {exc}") from exc
                if not isinstance(parsed, dict):
                    raise ApiError(400, "json_error", "the body must be a JSON object")
                body = parsed
            self._authorize(request.header("Authorization"), request.method)
            status, answer = self._route(request.method, request.path, request.query, body)
        except ApiError as error:
            status, answer = error.status, error.body()
        return Reply.json(status, answer)

    def failure(self, status: int, request: Request) -> Reply:
        codes = {500: "server_error", 502: "bad_gateway", 503: "unavailable", 504: "timeout"}
        code = codes.get(status, "unknown_error")
        return Reply.json(status, ApiError(status, code, f"injected failure of {request.method} {request.path}").body())

    def _authorize(self, header: str, method: str) -> None:
        scheme, _, token = header.partition(" ")
        scope = self.tokens.get(token) if scheme == "Bearer" else None
        if scope is None:
            raise ApiError(401, "unauthorized", "unable to authenticate")
        if scope == "read" and method != "GET":
            raise ApiError(403, "token_readonly", "The token is only allowed to perform GET requests")

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: Json) -> tuple[int, Json]:
        parts = path.strip("/").split("/")
        match method, parts:
            case "GET", ["locations"]:
                return 200, self._list(
                    "locations", [self._location(loc) for loc in self._named(self.catalogue.locations, query)]
                )
            case "GET", ["locations", ident]:
                loc = next((x for x in self.catalogue.locations if str(x.id) == ident), None)
                if loc is None:
                    raise _not_found("location", ident)
                return 200, {"location": self._location(loc)}
            case "GET", ["server_types"]:
                types = self._named(self.catalogue.server_types, query)
                return 200, self._list("server_types", [self._server_type(t) for t in types])
            case "GET", ["server_types", ident]:
                server_type = next((t for t in self.catalogue.server_types if str(t.id) == ident), None)
                if server_type is None:
                    raise _not_found("server_type", ident)
                return 200, {"server_type": self._server_type(server_type)}
            case "GET", ["images"]:
                return 200, self._list("images", self._images(query))
            case "GET", ["actions"]:
                ids = {int(i) for i in query.get("id", []) if i.isdigit()}
                found = [self._poll(a) for i, a in sorted(self.actions.items()) if not ids or i in ids]
                return 200, self._list("actions", found)
            case "GET", ["actions", ident]:
                return 200, {"action": self._poll(self._get(self.actions, ident, "action"))}
            case "GET", ["firewalls"]:
                return 200, self._list("firewalls", self._filtered(self.firewalls, query))
            case "POST", ["firewalls"]:
                return 201, self._create_firewall(body)
            case "GET", ["firewalls", ident]:
                return 200, {"firewall": self._get(self.firewalls, ident, "firewall")}
            case "PUT", ["firewalls", ident]:
                return 200, {"firewall": self._update(self.firewalls, ident, "firewall", body)}
            case "DELETE", ["firewalls", ident]:
                self._delete_firewall(ident)
                return 204, {}
            case "POST", ["firewalls", ident, "actions", command]:
                return 201, self._firewall_action(ident, command, body)
            case "GET", ["servers"]:
                return 200, self._list("servers", self._filtered(self.servers, query))
            case "POST", ["servers"]:
                return 201, self._create_server(body)
            case "GET", ["servers", ident]:
                return 200, {"server": self._get(self.servers, ident, "server")}
            case "PUT", ["servers", ident]:
                return 200, {"server": self._update(self.servers, ident, "server", body)}
            case "DELETE", ["servers", ident]:
                return 200, {"action": self._delete_server(ident)}
            case "POST", ["servers", ident, "actions", command]:
                return 201, {"action": self._server_action(ident, command, body)}
        raise ApiError(404, "not_found", f"no route {method} {path}")

    # ---- catalogue -----------------------------------------------------

    @staticmethod
    def _named(items: tuple[Any, ...], query: dict[str, list[str]]) -> list[Any]:
        names = query.get("name")
        return [x for x in items if not names or x.name in names]

    @staticmethod
    def _list(key: str, items: list[Json]) -> Json:
        return {key: items, "meta": _pagination(len(items))}

    @staticmethod
    def _location(loc: Location) -> Json:
        return {"id": loc.id, "name": loc.name, "description": f"{loc.city} DC Park 1", "country": loc.country,
                "city": loc.city, "latitude": 0.0, "longitude": 0.0, "network_zone": loc.network_zone}  # fmt: skip

    def _server_type(self, t: ServerType) -> Json:
        sold = [loc for loc in self.catalogue.locations if loc.name in t.locations]
        return {
            "id": t.id, "name": t.name, "description": t.name.upper(), "category": "shared",
            "cores": t.cores, "memory": t.memory, "disk": t.disk, "storage_type": "local", "cpu_type": "shared",
            "architecture": t.architecture, "deprecated": False, "deprecation": None, "included_traffic": 0,
            "prices": [{"location": loc.name, "price_hourly": {"net": "0.0100", "gross": "0.0119"},
                        "price_monthly": {"net": "4.0000", "gross": "4.7600"}} for loc in sold],
            "locations": [{"id": loc.id, "name": loc.name, "recommended": False, "available": True,
                           "deprecation": None} for loc in sold],
        }  # fmt: skip

    def _image(self, name: str, architecture: str) -> Json:
        index = self.catalogue.images.index(name)
        flavor, _, version = name.partition("-")
        return {
            "id": 5000 + 2 * index + (architecture == "arm"), "status": "available", "type": "system",
            "name": name, "description": name, "image_size": None, "disk_size": 5,
            "created": "2024-01-01T00:00:00+00:00", "created_from": None, "bound_to": None,
            "os_flavor": flavor, "os_version": version,
            "architecture": architecture, "rapid_deploy": True, "protection": {"delete": False},
            "deprecated": None, "deleted": None, "labels": {},
        }  # fmt: skip

    def _images(self, query: dict[str, list[str]]) -> list[Json]:
        names = query.get("name") or list(self.catalogue.images)
        arches = query.get("architecture") or ["x86", "arm"]
        return [self._image(n, a) for n in names if n in self.catalogue.images for a in arches]

    # ---- resources -----------------------------------------------------

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    @staticmethod
    def _get(table: dict[int, Json], ident: str, kind: str) -> Json:
        if not ident.isdigit() or int(ident) not in table:
            raise _not_found(kind, ident)
        return table[int(ident)]

    @staticmethod
    def _filtered(table: dict[int, Json], query: dict[str, list[str]]) -> list[Json]:
        items = list(table.values())
        if names := query.get("name"):
            items = [x for x in items if x["name"] in names]
        for selector in query.get("label_selector", []):
            for term in selector.split(","):
                key, _, value = term.partition("=")
                items = [x for x in items if key in x["labels"] and (not value or x["labels"][key] == value)]
        return items

    @staticmethod
    def _unique_name(table: dict[int, Json], name: str, kind: str, own_id: int | None = None) -> None:
        if any(x["name"] == name and x["id"] != own_id for x in table.values()):
            raise ApiError(409, "uniqueness_error", f"{kind} name is already used", {"fields": [{"name": "name"}]})

    def _update(self, table: dict[int, Json], ident: str, kind: str, body: Json) -> Json:
        item = self._get(table, ident, kind)
        if "name" in body:
            name = body["name"]
            if not isinstance(name, str) or not name or (kind == "server" and not _HOSTNAME.match(name)):
                raise _invalid(
                    "name", f"{kind} name must be a valid hostname" if kind == "server" else "name is required"
                )
            self._unique_name(table, name, kind, item["id"])
            item["name"] = name
        if "labels" in body:
            item["labels"] = _check_labels(body["labels"])
        return item

    def _action(self, command: str, resources: list[tuple[int, str]]) -> Json:
        """A new action: running until it is first polled, as real ones take a while."""
        action: Json = {
            "id": self._id(), "command": command, "status": "running", "progress": 0, "started": _now(),
            "finished": None, "error": None, "resources": [{"id": i, "type": t} for i, t in resources],
        }  # fmt: skip
        self.actions[action["id"]] = action
        return dict(action)

    def _poll(self, action: Json) -> Json:
        if action["status"] == "running":
            action.update(status="success", progress=100, finished=_now())
        return action

    @staticmethod
    def _rules(rules: object) -> list[Json]:
        if rules is None:
            return []
        if not isinstance(rules, list):
            raise _invalid("rules", "rules must be a list")
        out = []
        for rule in rules:
            if not isinstance(rule, dict) or rule.get("direction") not in ("in", "out"):
                raise _invalid("rules", "direction must be 'in' or 'out'")
            protocol = rule.get("protocol")
            if protocol not in ("tcp", "udp", "icmp", "esp", "gre"):
                raise _invalid("rules", f"unknown protocol {protocol!r}")
            port = rule.get("port")
            if (protocol in ("tcp", "udp")) != (port is not None):
                raise _invalid("rules", "a port is required for tcp and udp, and only for them")
            ips_key = "source_ips" if rule["direction"] == "in" else "destination_ips"
            ips = rule.get(ips_key) or []
            if not ips:
                raise _invalid("rules", f"{ips_key} must not be empty")
            for ip in ips:
                try:
                    ipaddress.ip_network(ip)
                except ValueError as exc:
                    raise _invalid("rules", f"invalid network {ip!r}") from exc
            out.append({
                "direction": rule["direction"], "protocol": protocol, "port": port,
                "source_ips": rule.get("source_ips") or [], "destination_ips": rule.get("destination_ips") or [],
                "description": rule.get("description"),
            })  # fmt: skip
        return out

    def _create_firewall(self, body: Json) -> Json:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise _invalid("name", "name is required")
        self._unique_name(self.firewalls, name, "firewall")
        firewall: Json = {
            "id": self._id(), "name": name, "labels": _check_labels(body.get("labels")), "created": _now(),
            "rules": self._rules(body.get("rules")), "applied_to": [],
        }  # fmt: skip
        fw_id: int = firewall["id"]
        self.firewalls[fw_id] = firewall
        actions = [self._action("set_firewall_rules", [(fw_id, "firewall")])] if firewall["rules"] else []
        return {"firewall": firewall, "actions": actions}

    def _delete_firewall(self, ident: str) -> None:
        firewall = self._get(self.firewalls, ident, "firewall")
        if firewall["applied_to"]:
            raise ApiError(422, "resource_in_use", "firewall is still applied to resources")
        del self.firewalls[firewall["id"]]

    def _apply(self, firewall: Json, server: Json) -> None:
        if not any(r.get("server", {}).get("id") == server["id"] for r in firewall["applied_to"]):
            firewall["applied_to"].append({"type": "server", "server": {"id": server["id"]}})
            server["public_net"]["firewalls"].append({"id": firewall["id"], "status": "applied"})

    def _detach(self, firewall: Json, server: Json) -> None:
        firewall["applied_to"] = [r for r in firewall["applied_to"] if r.get("server", {}).get("id") != server["id"]]
        server["public_net"]["firewalls"] = [f for f in server["public_net"]["firewalls"] if f["id"] != firewall["id"]]

    def _firewall_action(self, ident: str, command: str, body: Json) -> Json:
        firewall = self._get(self.firewalls, ident, "firewall")
        if command == "set_rules":
            firewall["rules"] = self._rules(body.get("rules"))
            return {"actions": [self._action("set_firewall_rules", [(firewall["id"], "firewall")])]}
        if command in ("apply_to_resources", "remove_from_resources"):
            key = "apply_to" if command == "apply_to_resources" else "remove_from"
            actions = []
            for resource in body.get(key) or []:
                server_id = str((resource.get("server") or {}).get("id", ""))
                if resource.get("type") != "server" or not server_id.isdigit() or int(server_id) not in self.servers:
                    raise ApiError(404, "firewall_resource_not_found", f"server with ID '{server_id}' not found")
                server = self.servers[int(server_id)]
                (self._apply if key == "apply_to" else self._detach)(firewall, server)
                command_name = "apply_firewall" if key == "apply_to" else "remove_firewall"
                actions.append(self._action(command_name, [(firewall["id"], "firewall"), (server["id"], "server")]))
            return {"actions": actions}
        raise ApiError(404, "not_found", f"no firewall action {command!r}")

    def _create_server(self, body: Json) -> Json:
        name = body.get("name")
        if not isinstance(name, str) or not _HOSTNAME.match(name):
            raise _invalid("name", "server name must be a valid hostname")
        self._unique_name(self.servers, name, "server")
        type_ref = body.get("server_type")
        server_type = self.catalogue.server_type(str(type_ref)) if type_ref is not None else None
        if server_type is None:
            raise _invalid("server_type", f"server type {type_ref!r} not found")
        location_name = body.get("location") or server_type.locations[0]
        location = self.catalogue.location(str(location_name))
        if location is None:
            raise ApiError(400, "invalid_input", f"location '{location_name}' not found")
        if location.name not in server_type.locations:
            # What Hetzner answers, e.g. for cax11 in ash.
            raise ApiError(400, "invalid_input", "unsupported location for server type")
        image_ref = str(body.get("image", ""))
        image = next((i for i in self._images({"architecture": [server_type.architecture]})
                      if image_ref in (i["name"], str(i["id"]))), None)  # fmt: skip
        if image is None:
            raise _invalid("image", f"image {image_ref!r} not found for architecture {server_type.architecture}")
        user_data = body.get("user_data") or ""
        if not isinstance(user_data, str) or len(user_data.encode()) > USER_DATA_LIMIT:
            raise _invalid("user_data", "user_data is limited to 32 KiB")
        labels = _check_labels(body.get("labels"))
        firewalls = []
        for ref in body.get("firewalls") or []:
            fw_id = (ref or {}).get("firewall")
            if fw_id not in self.firewalls:
                raise ApiError(404, "not_found", f"firewall with ID '{fw_id}' not found")
            firewalls.append(self.firewalls[fw_id])
        public_net = body.get("public_net") or {"enable_ipv4": True, "enable_ipv6": True}
        server_id = self._id()
        n = server_id % 250 + 1
        # Documentation addresses (RFC 5737 / RFC 3849): never routable.
        server: Json = {
            "id": server_id, "name": name, "status": "initializing", "created": _now(),
            "public_net": {
                "ipv4": {"id": server_id, "ip": f"203.0.113.{n}", "blocked": False, "dns_ptr": f"static.{n}.example"}
                if public_net.get("enable_ipv4", True) else None,
                "ipv6": {"id": server_id + 1, "ip": f"2001:db8:{n:x}::/64", "blocked": False, "dns_ptr": []}
                if public_net.get("enable_ipv6", True) else None,
                "floating_ips": [], "firewalls": [],
            },
            "private_net": [], "server_type": self._server_type(server_type), "included_traffic": 0,
            "outgoing_traffic": 0, "ingoing_traffic": 0, "backup_window": None, "rescue_enabled": False,
            "iso": None, "locked": False, "location": self._location(location),
            "datacenter": {"id": location.id, "name": f"{location.name}-dc1", "description": location.city,
                           "location": self._location(location)},
            "image": image, "protection": {"delete": False, "rebuild": False}, "labels": labels,
            "volumes": [], "primary_disk_size": server_type.disk, "placement_group": None, "load_balancers": [],
        }  # fmt: skip
        self.servers[server_id] = server
        self._user_data[server_id] = user_data
        for firewall in firewalls:
            self._apply(firewall, server)
        action = self._action("create_server", [(server_id, "server")])
        start = body.get("start_after_create", True)
        next_actions = [self._action("start_server", [(server_id, "server")])] if start else []
        server["status"] = "running" if start else "off"
        machine = self.hooks.on_server_created(dict(server), user_data)
        if machine is not None:
            for family, address in (("ipv4", machine.ipv4), ("ipv6", machine.ipv6)):
                if server["public_net"][family] is not None:
                    server["public_net"][family]["ip"] = address
        return {"server": server, "action": action, "next_actions": next_actions, "root_password": None}

    def _delete_server(self, ident: str) -> Json:
        server = self._get(self.servers, ident, "server")
        for firewall in self.firewalls.values():
            self._detach(firewall, server)
        server_id: int = server["id"]
        del self.servers[server_id]
        self._user_data.pop(server_id, None)
        self.hooks.on_server_deleted(dict(server))
        return self._action("delete_server", [(server_id, "server")])

    def _server_action(self, ident: str, command: str, body: Json) -> Json:
        server = self._get(self.servers, ident, "server")
        if command in ("shutdown", "poweroff"):
            self.hooks.on_server_shutdown(dict(server), "shutdown" if command == "shutdown" else "poweroff")
            server["status"] = "off"
        elif command in ("poweron", "reboot", "reset"):
            server["status"] = "running"
        elif command == "change_type":
            if server["status"] != "off":
                raise ApiError(412, "server_not_stopped", "server must be stopped before changing its type")
            server_type = self.catalogue.server_type(str(body.get("server_type", "")))
            if server_type is None:
                raise _invalid("server_type", f"server type {body.get('server_type')!r} not found")
            if server["location"]["name"] not in server_type.locations:
                raise ApiError(400, "invalid_input", "unsupported location for server type")
            if server_type.architecture != server["server_type"]["architecture"]:
                raise ApiError(400, "invalid_server_type", "the server type does not fit the server's architecture")
            server["server_type"] = self._server_type(server_type)
            server["primary_disk_size"] = server_type.disk if body.get("upgrade_disk") else server["primary_disk_size"]
        else:
            raise ApiError(404, "not_found", f"no server action {command!r}")
        command_name = {"shutdown": "shutdown_server", "poweroff": "stop_server", "poweron": "start_server",
                        "change_type": "change_server_type"}.get(command, f"{command}_server")  # fmt: skip
        return self._action(command_name, [(server["id"], "server")])
