"""`make verify`'s probe pod on a real API server (`make cluster-api`).

- The real Pod Security admission admits the probe pod into a namespace
  labelled as the stack labels a protected one (`restricted`, enforced), for
  the default image and uid and for the test cluster's image, and refuses the
  same pod with one setting weakened (so the admission is really judging it).
- tools/verify.py with the real kubectl against that API server: a probe pod
  left by an earlier run that was killed is deleted first; the new probe pod
  is created, becomes Running (kwok runs it: pods on its fake node have no
  containers, so nothing can be exec'd into them and every check in the pod
  is reported as not run, a FAIL), and is deleted before run_verify returns.
  What the checks see in a real pod is the real cluster suite's to show.
"""

from __future__ import annotations

import copy
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from builders.kube import namespace
from builders.relay import RUN_AS
from tests.support import apiserver
from tools import verify

pytestmark = pytest.mark.engine

CACHE_BIN = Path(os.environ.get("TS_EGRESS_CACHE", Path.home() / ".cache" / "tailscale-egress")) / "bin"


@pytest.fixture
def restricted_namespace(cluster: apiserver.Cluster) -> Iterator[str]:
    """A namespace with the Pod Security labels the stack gives a protected one."""
    name = f"verify-{secrets.token_hex(3)}"
    status, answer = cluster.request("POST", "/api/v1/namespaces", namespace(name))
    assert status == 201, answer
    yield name
    cluster.request("DELETE", f"/api/v1/namespaces/{name}")


@pytest.mark.parametrize(("image", "uid"), [(verify.DEFAULT_IMAGE, RUN_AS), ("local/probe:1", 1000)])
def test_probe_pod_is_admitted_by_pod_security_restricted(
    cluster: apiserver.Cluster, restricted_namespace: str, image: str, uid: int
) -> None:
    ns = restricted_namespace
    pod = verify.probe_pod(ns, verify.probe_pod_name(), image, run_as=uid)
    status, answer = cluster.request("POST", f"/api/v1/namespaces/{ns}/pods?dryRun=All", pod)
    assert status == 201, answer.get("message", answer)


@pytest.mark.parametrize(
    "weaken",
    [
        lambda c: c["securityContext"].pop("allowPrivilegeEscalation"),
        lambda c: c["securityContext"].update(capabilities={"drop": []}),
        lambda c: c["securityContext"].update(runAsUser=0),
    ],
    ids=["privilege-escalation", "capabilities", "root"],
)
def test_a_weakened_probe_pod_is_refused(
    cluster: apiserver.Cluster, restricted_namespace: str, weaken: Callable[[dict[str, Any]], object]
) -> None:
    ns = restricted_namespace
    pod = copy.deepcopy(verify.probe_pod(ns, verify.probe_pod_name(), verify.DEFAULT_IMAGE))
    weaken(pod["spec"]["containers"][0])
    status, answer = cluster.request("POST", f"/api/v1/namespaces/{ns}/pods?dryRun=All", pod)
    assert status == 403, answer
    assert "violates PodSecurity" in answer["message"]


def _kubectl() -> str:
    found = shutil.which("kubectl", path=f"{CACHE_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        message = "kubectl is not installed: install kubectl 1.28 or later (https://kubernetes.io/docs/tasks/tools/)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    assert found is not None
    return found


def _probe_pods(cluster: apiserver.Cluster, ns: str) -> list[str]:
    selector = ",".join(f"{k}={v}" for k, v in verify.PROBE_LABELS.items())
    status, answer = cluster.request("GET", f"/api/v1/namespaces/{ns}/pods?labelSelector={quote(selector)}")
    assert status == 200, answer
    return [p["metadata"]["name"] for p in answer["items"] if not p["metadata"].get("deletionTimestamp")]


def test_verify_sweeps_a_leftover_and_removes_its_own_probe_pod(
    cluster: apiserver.Cluster, restricted_namespace: str
) -> None:
    ns = restricted_namespace
    leftover = verify.probe_pod(ns, "tailscale-egress-verify-killed", verify.DEFAULT_IMAGE)
    status, answer = cluster.request("POST", f"/api/v1/namespaces/{ns}/pods", leftover)
    assert status == 201, answer
    config = verify.VerifyConfig(
        namespaces=(ns,),
        relay_namespace=ns,
        expected_exit_ips=("203.0.113.10",),
        kubeconfig=str(cluster.kubeconfig),
        context=apiserver.Cluster.context(),
        probe_kind="curl",
        targets=(verify.Target("metadata", verify.METADATA_IP, (80,)),),
        connect_timeout=1,
        pod_timeout=90,
        kubectl=_kubectl(),
    )
    seen: list[str] = []
    lock = threading.Lock()

    def watching(argv: list[str], timeout: float, stdin: str | None) -> verify.Completed:
        # The real kubectl; we only note which probe pods exist when the first exec starts.
        with lock:
            if "exec" in argv and not seen:
                seen.extend(_probe_pods(cluster, ns))
        return verify.subprocess_runner(argv, min(timeout, 15), stdin)

    results = verify.run_verify(config, watching, log=lambda _: None)  # type: ignore[arg-type]
    assert len(seen) == 1 and seen[0] != leftover["metadata"]["name"], seen
    assert _probe_pods(cluster, ns) == []
    by_category = {r.category: r for r in results}
    assert not by_category["relay"].ok  # no relay in this namespace
    assert not by_category["metadata"].ok and "not checked" in by_category["metadata"].detail
    assert verify.exit_code(results) == 1
