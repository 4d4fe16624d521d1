"""What a pull request changes in each stack's rendered objects, as markdown.

    python devtools/render_diff.py --base <git rev> [--stacks-file .github/preview-stacks] [--out build/render-diff]
    python devtools/render_diff.py --compare <base render dir> <head render dir> --stack <name>
    python devtools/render_diff.py --list-stacks [--stacks-file .github/preview-stacks]

A laptop's cluster is unreachable from CI, so the pull-request workflow shows
the Kubernetes part of a change this way: `tools/render.py` (deterministic,
secrets redacted) renders each listed stack at the pull request's base and at
its head, and the two renders are compared file by file: every manifest, and
resources.json (every resource's inputs, Hetzner and Tailscale included) and
outputs.json. The base tree comes from `git archive`, rendered with the same
interpreter.

--base writes <out>/<stack>.md for each stack, <out>/comment.md (all of
them, cut to fit a pull-request comment) and <out>/summary.md (for the job
summary, cut only past 1 MB). Exit 0 when every head render
succeeded, 1 when one failed (its error is in the markdown), 2 on bad usage.
--list-stacks prints the stacks as a JSON list (the workflow's matrix).
"""

from __future__ import annotations

import argparse
import difflib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STACKS_FILE = ROOT / ".github" / "preview-stacks"
MARKER = "<!-- tailscale-egress-render-diff -->"
# GitHub refuses comments over 65536 characters, and job summaries over 1 MiB.
COMMENT_LIMIT = 60_000
SUMMARY_LIMIT = 1_000_000
_STACK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*){0,2}$")

Render = dict[str, str]  # path inside the render dir -> text


class UsageError(Exception):
    pass


def read_stacks(path: Path) -> list[str]:
    """Stack names, one a line; `#` starts a comment. Errors name the file and line."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file (list the stacks to preview there, one a line, such as: dev)")
    stacks: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if not _STACK_NAME.match(name):
            raise UsageError(f"{path}:{number}: {name!r} is not a stack name (such as dev, or org/project/dev)")
        if name in stacks:
            raise UsageError(f"{path}:{number}: {name!r} is listed twice")
        stacks.append(name)
    if not stacks:
        raise UsageError(f"{path}: lists no stack (one a line, such as: dev)")
    return stacks


def stack_file_name(stack: str) -> str:
    """Pulumi.<stack>.yaml names the stack without its organization and project."""
    return f"Pulumi.{stack.rsplit('/', 1)[-1]}.yaml"


def read_render(directory: Path) -> Render:
    if not directory.is_dir():
        return {}
    return {
        p.relative_to(directory).as_posix(): p.read_text()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and (p.suffix in (".yaml", ".json"))
    }


@dataclass(frozen=True)
class Change:
    path: str
    status: str  # added, removed, changed
    diff: str


def changes(base: Render, head: Render) -> list[Change]:
    found = []
    for path in sorted(set(base) | set(head)):
        old, new = base.get(path), head.get(path)
        if old == new:
            continue
        status = "added" if old is None else "removed" if new is None else "changed"
        lines = difflib.unified_diff(
            (old or "").splitlines(keepends=True),
            (new or "").splitlines(keepends=True),
            fromfile=f"base/{path}" if old is not None else "/dev/null",
            tofile=f"head/{path}" if new is not None else "/dev/null",
            n=3,
        )
        found.append(Change(path, status, "".join(line if line.endswith("\n") else line + "\n" for line in lines)))
    return found


def _fence(text: str) -> str:
    """A code fence longer than any backtick run in `text`."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def stack_markdown(stack: str, base: Render | None, head: Render, *, base_label: str, head_label: str) -> str:
    """One stack's section: a table of changed files, then each diff folded."""
    title = f"### `{stack}`: rendered objects, {base_label} → {head_label}"
    if base is None:
        base, note = {}, "\n_The base has no render of this stack (new stack, or its render failed there)._\n"
    else:
        note = ""
    found = changes(base, head)
    manifests = [c for c in found if c.path.startswith("manifests/")]
    counts = {s: sum(c.status == s for c in manifests) for s in ("added", "changed", "removed")}
    total = sum(p.startswith("manifests/") for p in head)
    if not found:
        return f"{title}\n{note}\nNo change: every object ({total} manifests), input and output renders the same.\n"
    out = [
        title,
        note,
        f"Kubernetes objects: {counts['added']} added, {counts['changed']} changed, {counts['removed']} removed"
        f" (of {total} at head).",
        "",
        "| file | change |",
        "|---|---|",
        *(f"| `{c.path}` | {c.status} |" for c in found),
        "",
    ]
    for c in found:
        fence = _fence(c.diff)
        out += [f"<details><summary><code>{c.path}</code> ({c.status})</summary>", "", f"{fence}diff", c.diff + fence]
        out += ["", "</details>", ""]
    return "\n".join(out)


def error_markdown(stack: str, head_label: str, error: str) -> str:
    fence = _fence(error)
    return f"### `{stack}`: the render failed at {head_label}\n\n{fence}\n{error.strip()}\n{fence}\n"


def comment(sections: list[str], *, limit: int = COMMENT_LIMIT, rest: str = "this workflow run's job summary") -> str:
    """The pull-request comment: a marker (to update it in place), a header, the sections, cut to `limit`
    with a pointer to where the `rest` is."""
    header = (
        f"{MARKER}\n## Kubernetes objects this pull request changes\n\n"
        "CI cannot reach your cluster, so this is the deterministic render (`make render STACK=<stack>`) of each"
        " stack at the base and at the head of this pull request. Secret values appear as `[secret]`."
        " The Hetzner and Tailscale parts are previewed for real in the `pulumi preview` comment.\n\n"
    )
    body = "\n".join(sections)
    if len(header) + len(body) <= limit:
        return header + body
    cut = f"\n\n_… cut to fit: the whole diff is in {rest}._\n"
    keep = max(0, limit - len(header) - len(cut))
    text = body[:keep]
    # Never leave a fence open: close every one the cut opened.
    fences = re.findall(r"^(`{3,})", text, flags=re.MULTILINE)
    if len(fences) % 2:
        text += "\n" + fences[-1]
    return header + text + cut


# --- rendering base and head ---


def render_tree(tree: Path, stack: str, out: Path) -> str | None:
    """Render `stack` from the program in `tree` into `out`; the error text, or None."""
    config_file = tree / stack_file_name(stack)
    if not config_file.is_file():
        return f"no stack file {config_file.name}"
    result = subprocess.run(
        [sys.executable, str(tree / "tools" / "render.py"), stack.rsplit("/", 1)[-1], "--config-file",
         str(config_file), "--out", str(out)],
        cwd=tree, capture_output=True, text=True, check=False,
    )  # fmt: skip
    return None if result.returncode == 0 else (result.stderr or result.stdout).strip()


def export_rev(rev: str, dest: Path) -> None:
    """The files of `rev` (no .git) into `dest`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev], capture_output=True, check=False)
    if archive.returncode != 0:
        raise UsageError(f"git archive {rev}: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")


def short(rev: str) -> str:
    result = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True)
    return result.stdout.strip() or rev


def run_diff(base_rev: str, stacks: list[str], out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    base_label, head_label = f"base `{short(base_rev)}`", "head `" + short("HEAD") + "`"
    sections, failed = [], False
    with tempfile.TemporaryDirectory(prefix="render-diff-") as tmp:
        base_tree = Path(tmp) / "base"
        export_rev(base_rev, base_tree)
        for stack in stacks:
            base_dir, head_dir = Path(tmp) / "renders" / "base" / stack, Path(tmp) / "renders" / "head" / stack
            head_error = render_tree(ROOT, stack, head_dir)
            if head_error is not None:
                failed = True
                section = error_markdown(stack, head_label, head_error)
            else:
                base_error = render_tree(base_tree, stack, base_dir)
                base = None if base_error is not None else read_render(base_dir)
                section = stack_markdown(
                    stack, base, read_render(head_dir), base_label=base_label, head_label=head_label
                )
            (out / f"{stack.replace('/', '_')}.md").write_text(section)
            sections.append(section)
    (out / "comment.md").write_text(comment(sections))
    rest = "`make render` of each stack at the base and head (build/render/<stack>)"
    (out / "summary.md").write_text(comment(sections, limit=SUMMARY_LIMIT, rest=rest))
    print(f"render_diff: {len(stacks)} stack(s) -> {out}/comment.md, {out}/summary.md")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--base", metavar="REV", help="git revision of the pull request's base")
    mode.add_argument("--compare", nargs=2, type=Path, metavar=("BASE_DIR", "HEAD_DIR"))
    mode.add_argument("--list-stacks", action="store_true")
    parser.add_argument("--stack", help="with --compare: the stack's name for the heading")
    parser.add_argument("--stacks-file", type=Path, default=STACKS_FILE)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "render-diff")
    args = parser.parse_args(argv)
    try:
        if args.compare:
            base_dir, head_dir = args.compare
            base = read_render(base_dir) if base_dir.is_dir() else None
            print(stack_markdown(args.stack or head_dir.name, base, read_render(head_dir),
                                 base_label="base", head_label="head"))  # fmt: skip
            return 0
        stacks = read_stacks(args.stacks_file)
        if args.list_stacks:
            print(json.dumps(stacks))
            return 0
        return run_diff(args.base, stacks, args.out)
    except UsageError as err:
        print(f"render_diff: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
