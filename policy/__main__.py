"""Entry point the Pulumi engine runs (via the Python language host, or the
`pulumi-analyzer-policy-python` shim): serves the pack over gRPC and blocks
forever, so tests import `policy.guardrails` and never this file."""

import sys
from pathlib import Path

# The engine runs this file with the pack's folder on sys.path; the checks
# live in the `policy` package, importable from the folder above.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from policy.guardrails import build_pack

build_pack()
