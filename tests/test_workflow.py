"""The pull-request workflow (.github/workflows/preview.yml): linted with
actionlint, pinned, least-privilege, and its own logic (devtools/render_diff.py,
devtools/policy_check.py) run against recorded renders and real ones."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools import policy_check, pr_comment, render_diff
from devtools.mockstack import evaluate
from tests.stacks import dev_config, repo_path, with_config
from tests.support.tools import executable
from tools.render import write_render

WORKFLOWS = repo_path(".github", "workflows")
PREVIEW = WORKFLOWS / "preview.yml"
RECORDED = repo_path("tests", "support", "render-diff")
CACHE_BIN = Path(os.environ.get("TS_EGRESS_CACHE", Path.home() / ".cache" / "tailscale-egress")) / "bin"


def workflow() -> dict[str, Any]:
    raw: dict[Any, Any] = yaml.safe_load(PREVIEW.read_text())
    # PyYAML reads the `on:` key as True (YAML 1.1).
    raw["on"] = raw.pop(True, raw.get("on"))
    return raw


JOB = "preview"


def steps() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = workflow()["jobs"][JOB]["steps"]
    return found


def step(name_or_id: str) -> dict[str, Any]:
    (found,) = [s for s in steps() if name_or_id in (s.get("id"), s.get("name"))]
    return found


def preview_step() -> dict[str, Any]:
    return step("pulumi preview of each stack")


def run_step(
    tmp_path: Path, found: dict[str, Any], env: dict[str, str], path: str | None = None, cwd: Path | None = None
) -> dict[str, str]:
    """Run a `run:` step of the workflow in bash as the runner would: its
    outputs and the variables it exports, plus its stdout as `stdout`."""
    output, github_env = tmp_path / "output", tmp_path / "env"
    output.touch()
    github_env.touch()
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", found["run"]],
        env={
            "PATH": path or os.environ["PATH"],
            "GITHUB_OUTPUT": str(output),
            "GITHUB_ENV": str(github_env),
            "RUNNER_TEMP": str(tmp_path),
            **env,
        },
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd or repo_path(),
    )
    assert done.returncode == 0, done.stderr
    lines = output.read_text().splitlines() + github_env.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line) | {"stdout": done.stdout}


# --- actionlint ---


def actionlint() -> Path:
    return executable("actionlint", "make lint-bins", CACHE_BIN / "actionlint")


def test_every_workflow_passes_actionlint() -> None:
    files = sorted(WORKFLOWS.glob("*.y*ml"))
    assert PREVIEW in files
    result = subprocess.run([actionlint(), *files], capture_output=True, text=True, cwd=repo_path())
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path: Path) -> None:
    # The lint is real: the same workflow with a typo in an expression and an unknown permission fails.
    broken = PREVIEW.read_text().replace("steps.stacks.outputs.list", "steps.stack.outputs.list", 1)
    broken = broken.replace("pull-requests: write", "pull-request: write", 1)
    target = tmp_path / ".github" / "workflows" / "preview.yml"
    target.parent.mkdir(parents=True)
    target.write_text(broken)
    result = subprocess.run([actionlint(), str(target)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert "steps.stack" in result.stdout and "pull-request" in result.stdout


# --- what the workflow does ---


def test_it_previews_every_pull_request_with_diff_policy_pack_and_a_pinned_cli() -> None:
    assert set(workflow()["on"]) == {"pull_request"}
    run = preview_step()["run"]
    assert 'pulumi preview --stack "$stack" --diff --policy-pack policy --non-interactive' in run
    (install,) = [s for s in steps() if str(s.get("uses", "")).startswith("pulumi/actions@")]
    assert "command" not in install["with"], "the action only installs the CLI"
    assert re.fullmatch(r"\d+\.\d+\.\d+", str(install["with"]["pulumi-version"])), "the CLI version is pinned"
    assert repo_path("policy", "PulumiPolicy.yaml").is_file()


def test_the_job_has_a_timeout() -> None:
    for name, job in workflow()["jobs"].items():
        assert 0 < job["timeout-minutes"] <= 60, name


def test_credentials_of_every_backend_reach_only_the_preview_step() -> None:
    env = preview_step()["env"]
    # Pulumi Cloud (a token, or the OIDC step's), and S3, Azure Blob and GCS backends.
    for name in (
        "PULUMI_BACKEND_URL", "PULUMI_CONFIG_PASSPHRASE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
        "AZURE_STORAGE_KEY", "GOOGLE_CREDENTIALS", "HCLOUD_TOKEN", "TAILSCALE_API_KEY",
        "TAILSCALE_OAUTH_CLIENT_ID", "TAILSCALE_OAUTH_CLIENT_SECRET",
    ):  # fmt: skip
        assert env[name] == "${{ secrets." + name + " }}", name
    assert env["PULUMI_ACCESS_TOKEN"] == "${{ secrets.PULUMI_ACCESS_TOKEN || env.PULUMI_ACCESS_TOKEN }}"
    assert {"AWS_REGION", "AZURE_STORAGE_ACCOUNT", "TAILSCALE_TAILNET"} <= set(env)
    # Elsewhere a secret is only tested for being set (`!= ''`), never handed over.
    text = PREVIEW.read_text()
    presence = len(re.findall(r"secrets\.\w+ != ''", text))
    assert presence == 2
    assert text.count("secrets.") == presence + sum(str(v).count("secrets.") for v in env.values())


def test_permissions_are_least_privilege_with_oidc() -> None:
    doc = workflow()
    assert doc["permissions"] == {}
    allowed = {"contents": "read", "pull-requests": "write", "id-token": "write"}
    for name, job in doc["jobs"].items():
        granted = job.get("permissions")
        assert isinstance(granted, dict), f"job {name} inherits permissions"
        assert granted.items() <= allowed.items(), f"job {name}: {granted}"
    # Checkout never leaves the token in .git/config for later steps.
    for job in doc["jobs"].values():
        for found in job["steps"]:
            if str(found.get("uses", "")).startswith("actions/checkout@"):
                assert found["with"]["persist-credentials"] is False


def test_every_action_is_pinned_by_commit_with_its_version_named() -> None:
    uses = re.findall(r"^\s*-?\s*uses:\s*(\S+)(.*)$", PREVIEW.read_text(), flags=re.MULTILINE)
    assert {u.split("@")[0] for u, _ in uses} == {"actions/checkout", "actions/setup-python", "pulumi/actions"}
    for action, comment in uses:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", action), action
        assert re.fullmatch(r"\s*# v\d+\.\d+\.\d+", comment), f"{action}: {comment!r}"
    pulumi = next(c for u, c in uses if u.startswith("pulumi/actions@"))
    assert pulumi.strip().startswith("# v7.")


@pytest.mark.parametrize(
    ("same_repository", "backend_url", "access_token", "oidc_org", "configured"),
    [
        ("true", "false", "false", "", False),  # nothing set up yet
        ("false", "true", "true", "acme", False),  # a fork: no secrets
        ("true", "true", "false", "", True),  # s3://, azblob://, gs://
        ("true", "false", "true", "", True),  # Pulumi Cloud, token
        ("true", "false", "false", "acme", True),  # Pulumi Cloud, OIDC
    ],
)
def test_without_a_backend_the_preview_is_skipped_with_a_notice_not_failed(
    tmp_path: Path, same_repository: str, backend_url: str, access_token: str, oidc_org: str, configured: bool
) -> None:
    env = {
        "SAME_REPOSITORY": same_repository,
        "HAS_BACKEND_URL": backend_url,
        "HAS_ACCESS_TOKEN": access_token,
        "PULUMI_OIDC_ORGANIZATION": oidc_org,
    }
    out = run_step(tmp_path, step("backend"), env)
    assert out["configured"] == str(configured).lower()
    if not configured:
        assert out["stdout"].startswith("::notice title=pulumi preview skipped::")
        assert out["skipped"] and out["skipped"] in out["stdout"]
    for later in (preview_step(), step("Short-lived backend credentials by OIDC")):
        assert "steps.backend.outputs.configured == 'true'" in later["if"]


def test_oidc_gives_each_configured_backend_short_lived_credentials(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "curl.log"
    # GitHub's token endpoint and Pulumi Cloud's token exchange, faked.
    (bin_dir / "curl").write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\n'
        'case "$*" in *api.pulumi.com*) echo \'{"access_token": "pul-short"}\' ;;\n'
        '  *) echo \'{"value": "jwt"}\' ;;\nesac\n'
    )
    (bin_dir / "curl").chmod(0o755)
    env = {
        "ACTIONS_ID_TOKEN_REQUEST_URL": "https://token.example/?x=1",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "req",
        "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/preview",
        "AZURE_CLIENT_ID": "client",
        "AZURE_TENANT_ID": "tenant",
        "GCP_WORKLOAD_IDENTITY_PROVIDER": "projects/1/locations/global/workloadIdentityPools/p/providers/gh",
        "GCP_SERVICE_ACCOUNT": "preview@p.iam.gserviceaccount.com",
        "PULUMI_OIDC_ORGANIZATION": "acme",
        "RUN_ID": "7",
    }
    out = run_step(tmp_path, step("Short-lived backend credentials by OIDC"), env, f"{bin_dir}:{os.environ['PATH']}")
    assert (
        out["AWS_ROLE_ARN"] == env["AWS_ROLE_ARN"] and Path(out["AWS_WEB_IDENTITY_TOKEN_FILE"]).read_text() == "jwt\n"
    )
    assert Path(out["AZURE_FEDERATED_TOKEN_FILE"]).is_file() and out["AZURE_TENANT_ID"] == "tenant"
    google = json.loads(Path(out["GOOGLE_APPLICATION_CREDENTIALS"]).read_text())
    assert google["type"] == "external_account" and google["audience"].endswith("/providers/gh")
    assert out["PULUMI_ACCESS_TOKEN"] == "pul-short" and "::add-mask::pul-short" in out["stdout"]
    audiences = re.findall(r"audience=(\S+)", calls.read_text())
    assert audiences[:3] == [
        "sts.amazonaws.com",
        "api://AzureADTokenExchange",
        "https://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/gh",
    ]


def test_each_stack_is_previewed_and_one_failure_fails_the_step_after_all_ran(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "pulumi.log"
    # A pulumi whose preview of `broken` fails.
    (bin_dir / "pulumi").write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\n'
        'case "$*" in *"--stack acme/tailscale-egress/broken"*) echo boom; exit 255;; esac\n'
        "echo 'Resources: 2 unchanged'\n"
    )
    (bin_dir / "pulumi").chmod(0o755)
    found = dict(preview_step())
    found["run"] = found["run"].replace('exit "$status"', 'echo "status=$status" >> "$GITHUB_OUTPUT"')
    env = {"STACKS": "preview acme/tailscale-egress/broken", "PULUMI_BACKEND_URL": "s3://bucket"}
    out = run_step(tmp_path, found, env, f"{bin_dir}:{os.environ['PATH']}", cwd=tmp_path)
    assert out["status"] == "1"
    previews = pr_comment.read_previews(tmp_path / "build" / "preview")
    assert previews == {"preview": ("Resources: 2 unchanged\n", 0), "broken": ("boom\n", 255)}
    logged = calls.read_text().splitlines()
    assert logged[0] == "login s3://bucket"
    assert "--exclude urn:pulumi:broken::tailscale-egress::pulumi:providers:kubernetes::cluster" in logged[2]


def test_one_comment_per_pull_request_edited_in_place() -> None:
    posting = [s for s in steps() if "issues/$PR/comments" in str(s.get("run", ""))]
    assert len(posting) == 1, "one step writes the comment"
    run = posting[0]["run"]
    assert "--method PATCH" in run and "--method POST" in run and "startswith" in run
    assert "devtools/pr_comment.py" in run
    assert list(workflow()["jobs"]) == [JOB], "one job: no comment per stack or per job"


def test_the_kubernetes_part_is_excluded_from_the_preview_and_shown_by_the_render_diff() -> None:
    run = preview_step()["run"]
    assert '--exclude "$urn" --exclude-dependents' in run
    assert "::tailscale-egress::pulumi:providers:kubernetes::cluster" in run
    runs = "\n".join(str(s.get("run", "")) for s in steps())
    assert "devtools/render_diff.py --base HEAD^1" in runs
    assert "devtools/policy_check.py" in runs
    assert "GITHUB_STEP_SUMMARY" in runs


def test_the_stacks_are_listed_in_one_place_and_are_preview_stacks_holding_no_credentials() -> None:
    assert "devtools/render_diff.py --list-stacks" in step("stacks")["run"]
    stacks = render_diff.read_stacks(render_diff.STACKS_FILE)
    assert "dev" not in stacks, "the example stack is not the one CI previews"
    for stack in stacks:
        path = repo_path(render_diff.stack_file_name(stack))
        assert path.is_file(), stack
        config = yaml.safe_load(path.read_text()).get("config", {})
        # A provider credential in the stack's file would override CI's read-only one.
        assert not [k for k in config if k.split(":")[0] in ("hcloud", "tailscale", "kubernetes")], stack


def test_the_make_targets_and_scripts_the_workflow_runs_exist() -> None:
    makefile = repo_path("Makefile").read_text()
    runs = "\n".join(str(s.get("run", "")) for job in workflow()["jobs"].values() for s in job["steps"])
    for target in re.findall(r"\bmake ([\w -]+)", runs):
        for name in target.split():
            assert re.search(rf"^{re.escape(name)}:", makefile, flags=re.MULTILINE), f"make {name}"
    for script in re.findall(r"(?<![\w/])(?:dev)?tools/\w+\.py", runs):
        assert repo_path(script).is_file(), script


# --- devtools/pr_comment.py: the one comment ---


def test_the_comment_holds_the_render_diff_and_each_stacks_preview_under_one_marker() -> None:
    text = pr_comment.combine("render part", {"preview": ("+ create server\nResources: 1 to create", 0)})
    assert text.startswith(pr_comment.MARKER + "\n")
    assert text.index("render part") < text.index("### `preview`: pulumi preview succeeded")
    assert "Resources: 1 to create" in text
    failed = pr_comment.combine("r", {"a": ("error: boom", 255)})
    assert "pulumi preview failed (exit 255)" in failed


def test_a_skipped_preview_says_why_and_a_long_one_is_cut_to_fit() -> None:
    skipped = pr_comment.combine("r", {}, skipped="no backend configured")
    assert "Skipped: no backend configured" in skipped
    long = "\n".join(f"line {i} " + "x" * 80 for i in range(5000)) + "\nResources: 3 to update"
    text = pr_comment.combine("r" * 30_000, {"a": (long, 0), "b": (long, 0)})
    assert len(text) <= pr_comment.LIMIT
    assert text.count("Resources: 3 to update") == 2, "the end of each output is kept"
    assert len(re.findall(r"^`{3,}", text, flags=re.MULTILINE)) % 2 == 0


# --- devtools/render_diff.py on recorded renders ---


def test_the_recorded_change_shows_each_added_and_changed_object_with_its_diff() -> None:
    base, head = render_diff.read_render(RECORDED / "base"), render_diff.read_render(RECORDED / "head")
    text = render_diff.stack_markdown("dev", base, head, base_label="base `aaaa`", head_label="head `bbbb`")
    assert text.startswith("### `dev`: rendered objects, base `aaaa` → head `bbbb`")
    assert "Kubernetes objects: 3 added, 2 changed, 0 removed (of 8 at head)." in text
    rows = re.findall(r"^\| `([^`]+)` \| (\w+) \|$", text, flags=re.MULTILINE)
    assert rows == [
        ("manifests/configmap-team-a-tailscale-egress-proxy.yaml", "added"),
        ("manifests/deployment-tailscale-egress-relay.yaml", "changed"),
        ("manifests/namespace-_cluster-team-a.yaml", "added"),
        ("manifests/networkpolicy-tailscale-egress-relay-ingress.yaml", "changed"),
        ("manifests/networkpolicy-team-a-tailscale-egress-only-via-relay.yaml", "added"),
        ("outputs.json", "changed"),
    ]
    assert (
        "-        image: ghcr.io/tailscale/tailscale:v1.102.5\n+        image: ghcr.io/tailscale/tailscale:v1.104.0"
        in text
    )
    assert "+  name: team-a" in text
    # Unchanged objects are not repeated.
    assert "configmap-default-tailscale-egress-proxy.yaml" not in text
    assert text.count("```diff") == text.count("</details>") == 6


def test_a_removed_object_and_a_stack_new_in_the_pull_request(tmp_path: Path) -> None:
    head = render_diff.read_render(RECORDED / "head")
    fewer = {k: v for k, v in head.items() if "team-a" not in k}
    removed = render_diff.stack_markdown("dev", head, fewer, base_label="b", head_label="h")
    assert "0 added, 0 changed, 3 removed (of 5 at head)" in removed
    assert "+++ /dev/null" in removed
    new = render_diff.stack_markdown("dev", None, head, base_label="b", head_label="h")
    assert "The base has no render of this stack" in new and "8 added" in new


def test_the_same_render_twice_is_no_change() -> None:
    head = render_diff.read_render(RECORDED / "head")
    text = render_diff.stack_markdown("dev", head, dict(head), base_label="b", head_label="h")
    assert "No change: every object (8 manifests)" in text


def test_the_comment_fits_github_and_never_leaves_a_code_fence_open() -> None:
    base, head = render_diff.read_render(RECORDED / "base"), render_diff.read_render(RECORDED / "head")
    section = render_diff.stack_markdown("dev", base, head, base_label="b", head_label="h")
    whole = render_diff.comment([section])
    assert whole.startswith(render_diff.MARKER) and section in whole
    for limit in (2000, 2500, 3000, 4000):
        cut = render_diff.comment([section], limit=limit)
        assert len(cut) <= limit + 8 and "cut to fit: the whole diff is in" in cut
        assert len(re.findall(r"^`{3,}", cut, flags=re.MULTILINE)) % 2 == 0, limit


def test_a_diff_holding_backticks_gets_a_longer_fence() -> None:
    text = render_diff.stack_markdown(
        "dev", {"outputs.json": "a\n"}, {"outputs.json": "```\n"}, base_label="b", head_label="h"
    )
    assert "````diff" in text and "\n````\n" in text


# --- devtools/render_diff.py on real renders of two configs ---


def render(config: dict[str, Any], out: Path) -> render_diff.Render:
    evaluation = evaluate(config, "dev")
    assert evaluation.error is None, evaluation.error
    write_render(evaluation, out)
    return render_diff.read_render(out)


def test_two_configs_rendered_for_real_differ_by_exactly_the_new_namespace(tmp_path: Path) -> None:
    base = render(dev_config(), tmp_path / "base")
    again = render(dev_config(), tmp_path / "again")
    assert render_diff.changes(base, again) == []
    config = with_config(dev_config(), "cluster", protectedNamespaces=["default", {"name": "team-b", "create": True}])
    head = render(config, tmp_path / "head")
    found = {c.path: c.status for c in render_diff.changes(base, head) if c.path.startswith("manifests/")}
    added = {p for p, s in found.items() if s == "added"}
    assert added and all("team-b" in p for p in added), found
    assert any("networkpolicy-team-b" in p for p in added) and any("configmap-team-b" in p for p in added)


def test_base_and_head_of_this_repository_render_and_compare(tmp_path: Path) -> None:
    # What the workflow runs: the base from `git archive`, the head from the work tree.
    if not repo_path(".git").exists():
        pytest.skip("not a git checkout")
    assert render_diff.run_diff("HEAD", ["dev"], tmp_path) == 0
    text = (tmp_path / "comment.md").read_text()
    assert text.startswith(render_diff.MARKER)
    assert "### `dev`: rendered objects, base `" in text
    section = (tmp_path / "dev.md").read_text()
    assert section[:300] in text
    # The job summary holds it whole; the comment is cut only when it must be.
    assert section in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("# nothing\n\n", "lists no stack"),
        ("dev\nbad name\n", ":2: 'bad name' is not a stack name"),
        ("dev\ndev # again\n", ":2: 'dev' is listed twice"),
    ],
)
def test_a_bad_stacks_file_is_refused_naming_the_line(tmp_path: Path, content: str, error: str) -> None:
    path = tmp_path / "preview-stacks"
    path.write_text(content)
    with pytest.raises(render_diff.UsageError, match=re.escape(error)):
        render_diff.read_stacks(path)
    assert render_diff.main(["--list-stacks", "--stacks-file", str(path)]) == 2


def test_the_stacks_list_is_json_for_the_matrix(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "preview-stacks"
    path.write_text("dev  # the example\nacme/tailscale-egress/alice\n")
    assert render_diff.main(["--list-stacks", "--stacks-file", str(path)]) == 0
    assert json.loads(capsys.readouterr().out) == ["dev", "acme/tailscale-egress/alice"]
    assert render_diff.stack_file_name("acme/tailscale-egress/alice") == "Pulumi.alice.yaml"


# --- devtools/policy_check.py, the pack over each rendered stack ---


def test_policy_check_passes_the_dev_stack_and_refuses_a_bad_stack_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert policy_check.main(["dev"]) == 0
    assert "0 mandatory violation(s)" in capsys.readouterr().out
    bad = tmp_path / "Pulumi.bad.yaml"
    bad.write_text(yaml.safe_dump({"config": {"tailscale-egress:cluster": {"relayReplicas": 0}}}))
    assert policy_check.main(["bad", "--config-file", str(bad)]) == 2
    assert "relayReplicas" in capsys.readouterr().err
    broken = tmp_path / "Pulumi.broken.yaml"
    broken.write_text("config:\n  tailscale-egress:cluster: [\n")
    assert policy_check.main(["broken", "--config-file", str(broken)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
