"""`make bench`: how long evaluating a stack takes (Pulumi's mock engine,
nothing contacted), for the dev stack and for one protecting 40 namespaces.

Prints medians of several runs; exits 1 when 40 namespaces take more than
twice as long as one, the bound the project holds itself to.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.stacks import dev_config, with_config
from tools.mockstack import evaluate

RUNS = 7
MAX_RATIO = 2.0


def median_seconds(config: dict[str, object], stack: str) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        result = evaluate(config, stack)
        times.append(time.perf_counter() - start)
        if result.error is not None:
            raise SystemExit(f"bench: {stack} failed: {result.error}")
    return statistics.median(times)


def main() -> int:
    evaluate(dev_config(), "warm-up")  # imports and first-run caches, not measured
    one = median_seconds(dev_config(), "bench-1")
    many = [f"team-{i:02d}" for i in range(40)]
    forty = median_seconds(with_config(dev_config(), "cluster", protectedNamespaces=many), "bench-40")
    ratio = forty / one
    print(f"evaluate dev stack (1 protected namespace):  median {one * 1000:7.1f} ms over {RUNS} runs")
    print(f"evaluate 40 protected namespaces:            median {forty * 1000:7.1f} ms over {RUNS} runs")
    print(f"ratio: {ratio:.2f} (bound {MAX_RATIO})")
    return 0 if ratio <= MAX_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
