"""cloud-init's own schema check and shellcheck, run as commands (Debian
packages `cloud-init` and `shellcheck`).

cloud-init 22.4 (Debian 12) has no strict mode: `cloud-init schema` accepts
unknown top-level keys, and its `--annotate` crashes on some errors, so it is
not used. `top_level_keys()` reads the keys its schema knows, from the same
installation, so the tests can reject unknown ones themselves.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.tools import executable

APT_INSTALL = "apt-get install -y cloud-init shellcheck"

_KEYS_SCRIPT = """
import json
from cloudinit.config.schema import get_schema
schema = get_schema()
keys = set(schema.get("properties", {}))
for part in schema.get("allOf", []):
    name = part.get("$ref", "").rsplit("/", 1)[-1]
    keys |= set(schema.get("$defs", {}).get(name, {}).get("properties", {}))
print(json.dumps(sorted(keys)))
"""


@dataclass(frozen=True)
class Result:
    ok: bool
    output: str


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def cloud_init() -> Path:
    return executable("cloud-init", APT_INSTALL)


def schema_check(config_file: Path) -> Result:
    """`cloud-init schema --config-file`: ok only when it exits 0 and says the document is valid."""
    done = _run([str(cloud_init()), "schema", "--config-file", str(config_file)])
    output = done.stdout + done.stderr
    return Result(done.returncode == 0 and "Valid cloud-config" in done.stdout, output)


def _cloud_init_python() -> str:
    """The interpreter that runs cloud-init (its shebang), which can import `cloudinit`."""
    first = cloud_init().read_text().splitlines()[0]
    assert first.startswith("#!"), first
    return first[2:].strip().split()[0]


def top_level_keys() -> set[str]:
    done = _run([_cloud_init_python(), "-c", _KEYS_SCRIPT])
    if done.returncode != 0:
        raise RuntimeError(f"cannot read cloud-init's schema:\n{done.stderr}")
    keys = set(json.loads(done.stdout))
    if len(keys) < 20:
        raise RuntimeError(f"cloud-init's schema lists too few keys to be read right: {sorted(keys)}")
    return keys


def shellcheck(script: Path) -> Result:
    path = executable("shellcheck", APT_INSTALL)
    done = _run([str(path), "--severity=style", "--format=gcc", str(script)])
    return Result(done.returncode == 0, done.stdout + done.stderr)


def written_files(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A cloud-config's `write_files`, by path."""
    return {f["path"]: f for f in doc.get("write_files") or []}


def tailnet_input_guard(doc: dict[str, Any]) -> tuple[str, str, str]:
    """(unit name, unit text, script text) of the exit node's unit whose script
    drops what comes in from the tailnet: the guard, as the document carries it."""
    written = written_files(doc)
    found = []
    for path, entry in written.items():
        if not (path.startswith("/etc/systemd/system/") and path.endswith(".service")):
            continue
        for line in entry["content"].splitlines():
            target = line.split("=", 1)[1].strip() if line.startswith("ExecStart=") else ""
            if target in written and "-i tailscale0 -j DROP" in written[target]["content"]:
                found.append((Path(path).name, entry["content"], written[target]["content"]))
    assert len(found) == 1, "no single unit runs the tailnet input guard"
    return found[0]


def unit_directives(text: str) -> dict[str, set[str]]:
    """A systemd unit's directives, every value of a repeated key merged (as systemd does for lists)."""
    directives: dict[str, set[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", ";")):
            directives.setdefault(key.strip(), set()).update(value.split())
    return directives


def gpg_fingerprints(key_file: Path) -> list[str]:
    """The fingerprints gpg reads from a key file, primary key first, without importing it anywhere."""
    gpg = executable("gpg", "apt-get install -y gnupg")
    done = _run([str(gpg), "--show-keys", "--with-colons", "--with-fingerprint", str(key_file)])
    if done.returncode != 0:
        raise RuntimeError(f"gpg cannot read {key_file}:\n{done.stderr}")
    return [line.split(":")[9] for line in done.stdout.splitlines() if line.startswith("fpr:")]
