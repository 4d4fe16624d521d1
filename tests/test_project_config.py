"""Pulumi.yaml declares the keys the program reads, with a description and the
program's own defaults, so that `pulumi config` and the console show them."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from config import OTHER_KEYS, StackConfig, parse_config
from tests.stacks import repo_path

# Optional and secret: Pulumi makes a declared key without a default required,
# and a default would make the program read the key as given (Pulumi.yaml says so).
UNDECLARED = {"relayAuthKey"}


def project() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(repo_path("Pulumi.yaml").read_text())
    return loaded


def declared() -> dict[str, dict[str, Any]]:
    config: dict[str, dict[str, Any]] = project()["config"]
    return config


def test_every_key_the_program_reads_is_declared() -> None:
    read = {field.alias or name for name, field in StackConfig.model_fields.items()} | set(OTHER_KEYS)
    assert set(declared()) | UNDECLARED == read
    assert not UNDECLARED & set(declared())
    for key in UNDECLARED:
        assert f"Not declared here: {key}" in repo_path("Pulumi.yaml").read_text()


@pytest.mark.parametrize("section", ["exitNode", "tailnet", "cluster"])
def test_each_section_says_what_it_is_and_defaults_to_exactly_the_programs_defaults(section: str) -> None:
    declaration = declared()[section]
    assert declaration["type"] == "object"
    assert len(declaration["description"]) > 80 and "docs/configuration.md" in declaration["description"]
    programs = StackConfig().model_dump(by_alias=True)[section]
    assert set(declaration["default"]) == set(programs), "every key of the section, no other"
    # Pulumi hands the default to the program when a stack does not set the section:
    # it must mean exactly what no value means.
    assert parse_config({section: declaration["default"]}) == StackConfig()


def test_no_declaration_is_a_secret_in_plain_text_or_namespaced_by_another_project() -> None:
    for key, declaration in declared().items():
        assert ":" not in key or key.startswith("tailscale-egress:"), key
        assert not declaration.get("secret"), f"{key}: a secret cannot have a plain default"
        assert set(declaration) <= {"type", "description", "default", "secret", "items"}, key
