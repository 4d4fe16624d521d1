"""`make bench`: how long evaluating a stack takes (Pulumi's mock engine,
nothing contacted), for the dev stack and for one protecting 40 namespaces.

A stack is evaluated the way Pulumi runs the program: in a fresh Python
process (interpreter, imports, program, every resource registered). That is
the figure the bound applies to: 40 namespaces may take at most twice as long
as one. The same evaluations repeated inside one warm process are printed too:
they show what each namespace adds by itself.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.mockstack import evaluate
from tests.stacks import dev_config, with_config

RUNS = 5
MAX_RATIO = 2.0


def evaluate_once(config_file: str) -> int:
    """Child process: evaluate the config in `config_file` once."""
    result = evaluate(json.loads(Path(config_file).read_text()), "bench")
    if result.error is not None:
        print(f"bench: evaluation failed: {result.error}", file=sys.stderr)
        return 1
    return 0


def fresh_process_seconds(config: dict[str, Any]) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--evaluate-once", f.name], check=True)
        times.append(time.perf_counter() - start)
    Path(f.name).unlink()
    return statistics.median(times)


def warm_seconds(config: dict[str, Any]) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        result = evaluate(config, "bench")
        times.append(time.perf_counter() - start)
        if result.error is not None:
            raise SystemExit(f"bench: evaluation failed: {result.error}")
    return statistics.median(times)


def main() -> int:
    one = dev_config()
    forty = with_config(one, "cluster", protectedNamespaces=[f"team-{i:02d}" for i in range(40)])
    fresh_one, fresh_forty = fresh_process_seconds(one), fresh_process_seconds(forty)
    evaluate(one, "warm-up")
    warm_one, warm_forty = warm_seconds(one), warm_seconds(forty)
    ratio = fresh_forty / fresh_one
    print(f"medians of {RUNS} runs          1 namespace   40 namespaces   ratio")
    print(f"fresh process (as pulumi runs)  {fresh_one * 1000:8.0f} ms   {fresh_forty * 1000:10.0f} ms   {ratio:5.2f}")
    print(
        f"warm process (program only)     {warm_one * 1000:8.0f} ms   {warm_forty * 1000:10.0f} ms"
        f"   {warm_forty / warm_one:5.2f}"
    )
    print(f"each namespace adds {(warm_forty - warm_one) / 39 * 1000:.1f} ms (4 resources)")
    print(
        f"bound: 40 namespaces within {MAX_RATIO}x of one, fresh process: {'met' if ratio <= MAX_RATIO else 'NOT met'}"
    )
    return 0 if ratio <= MAX_RATIO else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--evaluate-once":
        sys.exit(evaluate_once(sys.argv[2]))
    sys.exit(main())
