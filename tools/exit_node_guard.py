"""Write the exit node guard for your own exit node (one the stack does not create).

    python tools/exit_node_guard.py [--out build/exit-node-guard]

Writes the guard script and its systemd units (the same files the Hetzner
exit node gets from its cloud-init document) under --out, at their paths on
the exit node, and install.sh. Copy the folder to the exit node and run
`sudo sh install.sh` there (docs/own-exit-node.md, "Guard your exit node").
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builders.exit_node_guard import INSTALL_SCRIPT, guard_files, install_script

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "build" / "exit-node-guard"


def write_guard(out: Path) -> list[Path]:
    shutil.rmtree(out, ignore_errors=True)
    written = []
    for path, (mode, content) in {**guard_files(), f"/{INSTALL_SCRIPT}": ("0755", install_script())}.items():
        target = out / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        target.chmod(int(mode, 8))
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    for path in write_guard(args.out):
        print(path)
    remote = f"/root/{args.out.name}/{INSTALL_SCRIPT}"
    print(f"\ncopy {args.out} to your exit node and run {INSTALL_SCRIPT} there as root, e.g.:")
    print(f"  scp -r {args.out} root@<exit node>:/root/ && ssh root@<exit node> sh {remote}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
