"""The emulated Hetzner Cloud API keeps Hetzner's rules, answers as Hetzner
does, and tells the tests' hooks what happened to each server."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.hetzner_api import USER_DATA_LIMIT, HetznerAPI, RecordingHooks, label_problem

RW = "w" * 64
RO = "r" * 64


@pytest.fixture
def api() -> Iterator[HetznerAPI]:
    with HetznerAPI({RW: "read_write", RO: "read"}).running() as running:
        yield running


def call(
    api: HetznerAPI, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = RW
) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        api.endpoint + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else {}
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def error_code(answer: dict[str, Any]) -> str:
    code: str = answer["error"]["code"]
    return code


def server(**overrides: Any) -> dict[str, Any]:
    body = {
        "name": "exit-1",
        "server_type": "cx23",
        "image": "debian-12",
        "location": "fsn1",
        "user_data": "#cloud-config\n",
    }
    return {**body, **overrides}


def firewall(name: str = "fw-1") -> dict[str, Any]:
    rule = {"direction": "in", "protocol": "udp", "port": "41641", "source_ips": ["0.0.0.0/0", "::/0"]}
    return {"name": name, "labels": {"stack": "dev"}, "rules": [rule]}


class TestTokens:
    def test_an_unknown_token_is_refused_with_401(self, api: HetznerAPI) -> None:
        status, answer = call(api, "GET", "/servers", token="x" * 64)
        assert (status, error_code(answer)) == (401, "unauthorized")

    def test_no_token_is_refused_with_401(self, api: HetznerAPI) -> None:
        status, answer = call(api, "GET", "/servers", token=None)
        assert (status, error_code(answer)) == (401, "unauthorized")

    def test_a_read_only_token_reads_but_cannot_write(self, api: HetznerAPI) -> None:
        assert call(api, "GET", "/servers", token=RO)[0] == 200
        status, answer = call(api, "POST", "/firewalls", firewall(), token=RO)
        assert (status, error_code(answer)) == (403, "token_readonly")
        assert api.firewalls == {}


class TestNames:
    def test_a_firewall_name_is_unique_in_the_project(self, api: HetznerAPI) -> None:
        assert call(api, "POST", "/firewalls", firewall("fw"))[0] == 201
        status, answer = call(api, "POST", "/firewalls", firewall("fw"))
        assert (status, error_code(answer)) == (409, "uniqueness_error")
        assert len(api.firewalls) == 1

    def test_a_server_name_is_unique_in_the_project_and_on_rename(self, api: HetznerAPI) -> None:
        assert call(api, "POST", "/servers", server(name="a"))[0] == 201
        status, answer = call(api, "POST", "/servers", server(name="a"))
        assert (status, error_code(answer)) == (409, "uniqueness_error")
        _, created = call(api, "POST", "/servers", server(name="b"))
        status, answer = call(api, "PUT", f"/servers/{created['server']['id']}", {"name": "a"})
        assert (status, error_code(answer)) == (409, "uniqueness_error")

    def test_a_server_name_must_be_a_hostname(self, api: HetznerAPI) -> None:
        status, answer = call(api, "POST", "/servers", server(name="not a hostname"))
        assert (status, error_code(answer)) == (400, "invalid_input")

    def test_lookup_by_name_finds_only_that_name(self, api: HetznerAPI) -> None:
        call(api, "POST", "/firewalls", firewall("fw-a"))
        call(api, "POST", "/firewalls", firewall("fw-b"))
        _, answer = call(api, "GET", "/firewalls?name=fw-b")
        assert [f["name"] for f in answer["firewalls"]] == ["fw-b"]


class TestLabels:
    @pytest.mark.parametrize(
        ("key", "value"),
        [("stack", "te-dev-1a2b3c"), ("managed-by", "tailscale-egress"), ("example.com/owner", ""), ("a.b_c-d", "x")],
    )
    def test_hetzner_label_syntax_is_accepted(self, key: str, value: str) -> None:
        assert label_problem(key, value) is None

    @pytest.mark.parametrize(
        ("key", "value"),
        [("-stack", "x"), ("stack", "x" * 64), ("stack", "has space"), ("Bad_Prefix/x", "y"), ("/x", "y"), ("k", "-v")],
    )
    def test_a_bad_label_is_refused_with_invalid_input(self, api: HetznerAPI, key: str, value: str) -> None:
        status, answer = call(api, "POST", "/firewalls", {**firewall(), "labels": {key: value}})
        assert (status, error_code(answer)) == (400, "invalid_input")
        assert answer["error"]["details"]["fields"][0]["name"] == "labels"


class TestUserData:
    def test_user_data_of_exactly_32_kib_is_accepted(self, api: HetznerAPI) -> None:
        status, _ = call(api, "POST", "/servers", server(user_data="x" * USER_DATA_LIMIT))
        assert status == 201
        assert api.user_data("exit-1") == "x" * USER_DATA_LIMIT

    def test_user_data_over_32_kib_is_refused(self, api: HetznerAPI) -> None:
        status, answer = call(api, "POST", "/servers", server(user_data="x" * (USER_DATA_LIMIT + 1)))
        assert (status, error_code(answer)) == (400, "invalid_input")
        assert api.servers == {}


class TestCatalogue:
    def test_a_server_type_not_sold_in_the_location_is_refused_as_hetzner_does(self, api: HetznerAPI) -> None:
        status, answer = call(api, "POST", "/servers", server(server_type="cax11", location="ash"))
        assert (status, answer["error"]["code"], answer["error"]["message"]) == (
            400, "invalid_input", "unsupported location for server type",
        )  # fmt: skip
        assert call(api, "POST", "/servers", server(server_type="cax11", location="fsn1"))[0] == 201

    def test_server_types_are_found_by_name_with_their_architecture(self, api: HetznerAPI) -> None:
        _, answer = call(api, "GET", "/server_types?name=cax11")
        (found,) = answer["server_types"]
        assert found["architecture"] == "arm"
        assert "ash" not in [loc["name"] for loc in found["locations"]]

    def test_an_image_is_found_by_name_for_one_architecture(self, api: HetznerAPI) -> None:
        _, answer = call(api, "GET", "/images?name=debian-12&architecture=arm")
        assert [(i["name"], i["architecture"]) for i in answer["images"]] == [("debian-12", "arm")]
        _, answer = call(api, "GET", "/images?name=windows-11")
        assert answer["images"] == []

    def test_an_unknown_server_type_is_refused(self, api: HetznerAPI) -> None:
        status, answer = call(api, "POST", "/servers", server(server_type="cx22"))
        assert (status, error_code(answer)) == (400, "invalid_input")


class TestActions:
    def test_an_action_runs_until_it_is_polled(self, api: HetznerAPI) -> None:
        _, created = call(api, "POST", "/servers", server())
        assert created["action"]["status"] == "running"
        _, polled = call(api, "GET", f"/actions?id={created['action']['id']}")
        assert [a["status"] for a in polled["actions"]] == ["success"]
        _, single = call(api, "GET", f"/actions/{created['action']['id']}")
        assert single["action"]["status"] == "success"

    def test_a_missing_server_is_404_not_found(self, api: HetznerAPI) -> None:
        status, answer = call(api, "GET", "/servers/424242")
        assert (status, error_code(answer)) == (404, "not_found")


class TestFirewalls:
    def test_a_server_created_with_a_firewall_has_it_applied(self, api: HetznerAPI) -> None:
        _, fw = call(api, "POST", "/firewalls", firewall())
        fw_id = fw["firewall"]["id"]
        _, created = call(api, "POST", "/servers", server(firewalls=[{"firewall": fw_id}]))
        server_id = created["server"]["id"]
        assert created["server"]["public_net"]["firewalls"] == [{"id": fw_id, "status": "applied"}]
        _, got = call(api, "GET", f"/firewalls/{fw_id}")
        assert got["firewall"]["applied_to"] == [{"type": "server", "server": {"id": server_id}}]

    def test_a_firewall_in_use_cannot_be_deleted_until_its_server_is_gone(self, api: HetznerAPI) -> None:
        _, fw = call(api, "POST", "/firewalls", firewall())
        fw_id = fw["firewall"]["id"]
        _, created = call(api, "POST", "/servers", server(firewalls=[{"firewall": fw_id}]))
        status, answer = call(api, "DELETE", f"/firewalls/{fw_id}")
        assert (status, error_code(answer)) == (422, "resource_in_use")
        assert call(api, "DELETE", f"/servers/{created['server']['id']}")[0] == 200
        assert call(api, "DELETE", f"/firewalls/{fw_id}")[0] == 204
        assert api.firewalls == {}

    def test_rules_are_replaced_by_set_rules(self, api: HetznerAPI) -> None:
        _, fw = call(api, "POST", "/firewalls", firewall())
        fw_id = fw["firewall"]["id"]
        rule = {"direction": "in", "protocol": "icmp", "source_ips": ["0.0.0.0/0"]}
        assert call(api, "POST", f"/firewalls/{fw_id}/actions/set_rules", {"rules": [rule]})[0] == 201
        assert [r["protocol"] for r in api.firewalls[fw_id]["rules"]] == ["icmp"]

    def test_a_tcp_rule_without_a_port_is_refused(self, api: HetznerAPI) -> None:
        rule = {"direction": "in", "protocol": "tcp", "source_ips": ["0.0.0.0/0"]}
        status, answer = call(api, "POST", "/firewalls", {"name": "fw", "rules": [rule]})
        assert (status, error_code(answer)) == (400, "invalid_input")


class TestServerLifecycle:
    def test_hooks_see_create_shutdown_and_delete_in_order_with_the_user_data(self) -> None:
        hooks = RecordingHooks()
        with HetznerAPI({RW: "read_write"}, hooks=hooks).running() as api:
            _, created = call(api, "POST", "/servers", server(user_data="#cloud-config\nhostname: x\n"))
            server_id = created["server"]["id"]
            call(api, "POST", f"/servers/{server_id}/actions/shutdown")
            assert api.servers[server_id]["status"] == "off"
            call(api, "DELETE", f"/servers/{server_id}")
        assert hooks.events == [("created", "exit-1"), ("shutdown", "exit-1"), ("deleted", "exit-1")]
        assert hooks.user_data == {"exit-1": "#cloud-config\nhostname: x\n"}

    def test_a_hard_poweroff_is_told_apart_from_the_acpi_shutdown(self) -> None:
        hooks = RecordingHooks()
        with HetznerAPI({RW: "read_write"}, hooks=hooks).running() as api:
            _, created = call(api, "POST", "/servers", server())
            call(api, "POST", f"/servers/{created['server']['id']}/actions/poweroff")
        assert hooks.events[-1] == ("poweroff", "exit-1")

    def test_a_running_server_cannot_change_type(self, api: HetznerAPI) -> None:
        _, created = call(api, "POST", "/servers", server())
        server_id = created["server"]["id"]
        status, answer = call(api, "POST", f"/servers/{server_id}/actions/change_type", {"server_type": "cx33"})
        assert (status, error_code(answer)) == (412, "server_not_stopped")
        call(api, "POST", f"/servers/{server_id}/actions/poweroff")
        status, _ = call(
            api, "POST", f"/servers/{server_id}/actions/change_type", {"server_type": "cx33", "upgrade_disk": True}
        )
        assert status == 201
        assert api.servers[server_id]["server_type"]["name"] == "cx33"

    def test_the_server_has_documentation_addresses(self, api: HetznerAPI) -> None:
        _, created = call(api, "POST", "/servers", server())
        net = created["server"]["public_net"]
        assert net["ipv4"]["ip"].startswith("203.0.113.")
        assert net["ipv6"]["ip"].startswith("2001:db8:")


class TestInjectedFailures:
    def test_a_failed_call_answers_503_and_changes_nothing_then_the_next_one_works(self, api: HetznerAPI) -> None:
        api.fail("POST", "/servers", 503)
        status, answer = call(api, "POST", "/servers", server())
        assert (status, error_code(answer)) == (503, "unavailable")
        assert api.servers == {}
        assert call(api, "POST", "/servers", server())[0] == 201

    def test_failures_match_only_their_method_and_path(self, api: HetznerAPI) -> None:
        api.fail("POST", r"/servers/\d+/actions/shutdown", 500, times=2)
        _, created = call(api, "POST", "/servers", server())
        path = f"/servers/{created['server']['id']}/actions/shutdown"
        assert [call(api, "POST", path)[0] for _ in range(3)] == [500, 500, 201]
        assert [c.status for c in api.calls_to("POST", r"/servers/\d+/actions/shutdown")] == [500, 500, 201]
