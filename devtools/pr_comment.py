"""The pull-request workflow's one comment: the render diff of every stack and
`pulumi preview` of each (or why it was skipped), under one marker, so that
the workflow edits the same comment on every push instead of adding more.

    python devtools/pr_comment.py --render build/render-diff/comment.md \
        --previews build/preview [--skipped "<why>"] --out build/comment.md

`--previews` holds `<stack>.txt` (the preview's output) and `<stack>.rc` (its
exit code) for each stack previewed.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

MARKER = "<!-- tailscale-egress-preview -->"
# GitHub refuses comments over 65536 characters.
LIMIT = 65_000
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def preview_section(stack: str, output: str, exit_code: int, budget: int) -> str:
    """One stack's preview, folded; only its last `budget` characters when longer
    (the plan's summary and any error come last)."""
    text = _ANSI.sub("", output).rstrip("\n")
    if len(text) > budget:
        text = "[... cut to fit: the whole output is in this workflow run's log]\n" + text[-budget:]
    fence = "`" * max([3, *(len(run) + 1 for run in re.findall(r"`{3,}", text))])
    verdict = "succeeded" if exit_code == 0 else f"failed (exit {exit_code})"
    return (
        f"### `{stack}`: pulumi preview {verdict}\n\n<details><summary>Hetzner and Tailscale plan"
        f" (the Kubernetes part is the render diff above)</summary>\n\n{fence}\n{text}\n{fence}\n\n</details>\n"
    )


def combine(render: str, previews: dict[str, tuple[str, int]], skipped: str | None = None, limit: int = LIMIT) -> str:
    """The whole comment, at most `limit` characters: the render diff as it
    is, then the previews sharing what is left."""
    parts = [MARKER, render.rstrip("\n"), "## pulumi preview"]
    if skipped is not None:
        parts.append(f"Skipped: {skipped}")
    elif not previews:
        parts.append("No stack was previewed.")
    head = "\n\n".join(parts) + "\n\n"
    overhead = 400  # each section's heading, fences and folding
    budget = max(0, (limit - len(head)) // max(1, len(previews)) - overhead)
    sections = [preview_section(stack, out, rc, budget) for stack, (out, rc) in sorted(previews.items())]
    return head + "\n".join(sections)


def read_previews(directory: Path) -> dict[str, tuple[str, int]]:
    found: dict[str, tuple[str, int]] = {}
    for output in sorted(directory.glob("*.txt")) if directory.is_dir() else []:
        code = output.with_suffix(".rc")
        found[output.stem] = (
            output.read_text(errors="replace"),
            int(code.read_text().strip() or 1) if code.exists() else 1,
        )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render", type=Path, required=True, help="the render diff's comment.md")
    parser.add_argument("--previews", type=Path, required=True, help="a directory of <stack>.txt and <stack>.rc")
    parser.add_argument("--skipped", help="why no preview ran")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    render = args.render.read_text() if args.render.is_file() else "The render diff did not run: see the job's log."
    text = combine(render, read_previews(args.previews), args.skipped)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"pr_comment: {len(text)} characters -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
