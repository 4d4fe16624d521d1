"""What runs is pinned, and what the data-path tests run is what a developer
deploys."""

from __future__ import annotations

import re

from config import RELAY_IMAGE
from tests.stacks import dev, kube_objects, repo_path


def test_the_data_path_tests_build_the_tailscale_version_of_the_relay_image() -> None:
    script = repo_path("scripts", "build-datapath-bins.sh").read_text()
    (version,) = re.findall(r"^TAILSCALE_VERSION=(v[\d.]+)$", script, flags=re.MULTILINE)
    assert f"ghcr.io/tailscale/tailscale:{version}" == RELAY_IMAGE
    (deployment,) = kube_objects(dev(), "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == RELAY_IMAGE


def test_every_python_requirement_is_pinned_to_one_version() -> None:
    for name in ("requirements.txt", "requirements-dev.txt", "tests/support/requirements-nca.txt"):
        for line in repo_path(*name.split("/")).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-r "):
                assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][\w.]*", line), f"{name}: {line!r} is not pinned"


def test_the_relay_image_is_pinned_by_the_program_and_the_example_stack_does_not_freeze_it() -> None:
    # An exact version, not a moving tag; a copy of the example that named it would never get the next one.
    assert re.fullmatch(r"ghcr\.io/tailscale/tailscale:v\d+\.\d+\.\d+", RELAY_IMAGE), RELAY_IMAGE
    assert "relayImage" not in repo_path("Pulumi.dev.yaml").read_text()
