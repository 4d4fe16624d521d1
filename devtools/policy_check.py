"""Run the policy pack over a stack without the Pulumi CLI, credentials or a cluster.

    python devtools/policy_check.py <stack> [--config-file Pulumi.<stack>.yaml]

The program is evaluated under mocks (as `make render` does) and every
resource it registers, with the stack's outputs, goes through pulumi-policy's
own analyzer service exactly as the engine sends it (`Analyze` per resource,
`AnalyzeStack` once), so the pack's real code decides. Prints one line per
violation; exit 1 on a mandatory violation, 2 on bad input or config.

The pull-request workflow runs it for every stack it previews: there the
Kubernetes objects cannot be previewed against a cluster, and this is how the
guardrails still see them. tests/test_policy_pack.py uses the same functions.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format, struct_pb2
from pulumi.runtime.proto import analyzer_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pulumi_policy.policy import _PolicyAnalyzerServicer  # the service the engine talks to

from devtools.mockstack import Evaluation, StackInputError, evaluate_stack_file, stack_arguments
from policy import guardrails

SECRET_SIG = "4dabf18193072939515e22adb298388d"
SECRET_VALUE = "1b47061264138c4ac30d75fd1eb44270"
PROJECT_URN = "urn:pulumi:stack::tailscale-egress::"


@dataclass
class Res:
    """A resource as the engine hands it to a pack: properties in Pulumi's wire form."""

    type: str
    name: str
    urn: str
    props: dict[str, Any]
    parent: str = ""


@dataclass(frozen=True)
class Diagnostic:
    policy: str
    message: str
    urn: str
    mandatory: bool


@dataclass
class Stack:
    resources: list[Res] = field(default_factory=list)

    def find(self, typ: str, name: str) -> Res:
        (found,) = [r for r in self.resources if r.type == typ and r.name == name]
        return found


def stack_of(evaluation: Evaluation) -> Stack:
    """Every registered resource, and the root Stack whose properties are the outputs."""
    resources = [Res(r.type, r.name, r.urn, copy.deepcopy(r.inputs), r.parent) for r in evaluation.resources]
    outputs = {
        k: {SECRET_SIG: SECRET_VALUE, "value": v} if k in evaluation.secret_outputs else v
        for k, v in evaluation.outputs.items()
    }
    resources.append(Res(guardrails.STACK, "stack", f"{PROJECT_URN}pulumi:pulumi:Stack::stack", outputs))
    return Stack(resources)


def _struct(props: dict[str, Any]) -> struct_pb2.Struct:
    return json_format.ParseDict(props, struct_pb2.Struct())


def analyze(stack: Stack) -> list[Diagnostic]:
    """Run the pack over `stack` through pulumi-policy's analyzer service."""
    service = _PolicyAnalyzerServicer(guardrails.PACK_NAME, "1.0.0", guardrails.policies(), guardrails.MANDATORY)
    responses = [
        service.Analyze(  # type: ignore[no-untyped-call]
            analyzer_pb2.AnalyzeRequest(urn=r.urn, type=r.type, name=r.name, properties=_struct(r.props)), None
        )
        for r in stack.resources
    ]
    request = analyzer_pb2.AnalyzeStackRequest(
        resources=[
            analyzer_pb2.AnalyzerResource(
                urn=r.urn, type=r.type, name=r.name, properties=_struct(r.props), parent=r.parent
            )
            for r in stack.resources
        ]
    )
    responses.append(service.AnalyzeStack(request, None))  # type: ignore[no-untyped-call]
    return [
        Diagnostic(d.policyName, d.message, d.urn, d.enforcementLevel == analyzer_pb2.MANDATORY)
        for response in responses
        for d in response.diagnostics
    ]


def report(diagnostics: list[Diagnostic]) -> list[str]:
    return [
        f"{'mandatory' if d.mandatory else 'advisory'} [{d.policy}] {d.message.replace(chr(10), ' - ')}"
        for d in diagnostics
    ]


def main(argv: list[str] | None = None) -> int:
    args = stack_arguments(__doc__).parse_args(argv)
    try:
        evaluation = evaluate_stack_file(args.stack, args.config_file)
    except StackInputError as err:
        print(f"policy_check: {err}", file=sys.stderr)
        return 2
    diagnostics = analyze(stack_of(evaluation))
    for line in report(diagnostics):
        print(line)
    failed = sum(d.mandatory for d in diagnostics)
    print(
        f"policy_check {args.stack}: {len(guardrails.policies())} policies, {len(evaluation.resources)} resources,"
        f" {failed} mandatory violation(s)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
