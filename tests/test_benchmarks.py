"""What the benchmarks say: where the relay's CPU goes (`make bench-cluster`),
the goals' verdicts (bench_stats) and the default stack's splits
(`make bench-default-stack`).

The input is `go tool pprof -traces` output in the form it prints for
tailscaled (stacks taken from a profile of the relay under load).
"""

from __future__ import annotations

from typing import Any

import pytest

from devtools import bench_default_stack, bench_stats, cpu_profile

TRACES = """\
File: tailscaled
Type: cpu
Duration: 5.01s, Total samples = 4.86s (96.98%)
-----------+-------------------------------------------------------
     110ms   runtime.memmove
             bytes.Clone (inline)
             tailscale.com/wgengine/netstack/gro.RXChecksumOffload
             tailscale.com/wgengine/netstack.(*Impl).injectInbound
             tailscale.com/net/tstun.(*Wrapper).Write
             github.com/tailscale/wireguard-go/device.(*Peer).RoutineSequentialReceiver
-----------+-------------------------------------------------------
      20ms   runtime.findObject
             runtime.wbBufFlush1
             gcWriteBarrier
             tailscale.com/wgengine/magicsock.(*Conn).getReceiveBatchForBuffs
             github.com/tailscale/wireguard-go/device.(*Device).RoutineReceiveIncoming
-----------+-------------------------------------------------------
     1.2s    golang.org/x/crypto/chacha20poly1305.chacha20Poly1305Open
             github.com/tailscale/wireguard-go/device.(*Device).RoutineDecryption
-----------+-------------------------------------------------------
      30ms   internal/runtime/gc/scan.ScanSpanPacked (inline)
             runtime.gcDrain
             runtime.gcBgMarkWorker.func2
-----------+-------------------------------------------------------
      40ms   runtime.memclrNoHeapPointers
             runtime.mallocgc
             runtime.gcAssistAlloc
             github.com/tailscale/wireguard-go/device.(*Device).PopulatePools.func3
-----------+-------------------------------------------------------
      10ms   internal/runtime/syscall/linux.Syscall6
             syscall.write
             github.com/tailscale/wireguard-go/tun.(*NativeTun).Write
             tailscale.com/net/tstun.(*Wrapper).Write
             github.com/tailscale/wireguard-go/device.(*Peer).RoutineSequentialReceiver
-----------+-------------------------------------------------------
     500us   runtime.futex
             runtime.findRunnable
             runtime.schedule
-----------+-------------------------------------------------------
      10ms   runtime.memmove
             io.copyBuffer
             io.Copy
             tailscale.com/cmd/tailscaled.httpProxyHandler.func1
-----------+-------------------------------------------------------
      10ms   main.somethingElse
"""


def samples() -> list[cpu_profile.Sample]:
    return cpu_profile.parse_traces(TRACES)


def test_each_sampled_stack_is_read_with_its_cpu_time_leaf_first() -> None:
    got = samples()
    assert [round(s.seconds, 4) for s in got] == [0.11, 0.02, 1.2, 0.03, 0.04, 0.01, 0.0005, 0.01, 0.01]
    assert got[0].frames[:2] == ("runtime.memmove", "bytes.Clone")  # " (inline)" is not part of the name
    assert got[0].frames[-1] == "github.com/tailscale/wireguard-go/device.(*Peer).RoutineSequentialReceiver"


@pytest.mark.parametrize(
    ("index", "expected"),
    [
        # A copy made by netstack's GRO is netstack's, though WireGuard called it.
        (0, "netstack TCP/IP (gVisor and its glue)"),
        # Runtime work with no collector in the stack belongs to who caused it.
        (1, "WireGuard and UDP (magicsock)"),
        (2, "ChaCha20-Poly1305"),
        (3, cpu_profile.GARBAGE_COLLECTION),
        # An allocation that had to assist the collector is the collector's cost.
        (4, cpu_profile.GARBAGE_COLLECTION),
        # Kernel mode: the write to the TUN device, not WireGuard's.
        (5, "TUN device and packet filter"),
        (6, cpu_profile.SCHEDULER),
        (7, "proxies (HTTP CONNECT, SOCKS5)"),
        (8, cpu_profile.OTHER),
    ],
)
def test_a_stack_is_charged_to_the_component_nearest_its_leaf(index: int, expected: str) -> None:
    assert cpu_profile.component(samples()[index].frames) == expected


def test_the_totals_add_up_and_the_largest_comes_first() -> None:
    totals = cpu_profile.by_component(samples())
    assert next(iter(totals)) == "ChaCha20-Poly1305"
    assert totals[cpu_profile.GARBAGE_COLLECTION] == pytest.approx(0.07)
    assert sum(totals.values()) == pytest.approx(sum(s.seconds for s in samples()))
    assert cpu_profile.shares(totals).startswith("ChaCha20-Poly1305 84% (1.20 s), netstack")


# The benchmarks' verdicts (devtools/bench_stats.py, issue 20).


def test_percentiles_interpolate_between_ranks() -> None:
    assert bench_stats.percentile([1, 2, 3, 4], 50) == 2.5
    assert bench_stats.percentile([5, 1, 3], 90) == pytest.approx(4.6)
    assert bench_stats.percentile([7], 99) == 7


def test_the_interval_holds_the_estimate_and_narrows_with_more_runs() -> None:
    noisy = [1.0, 1.4, 0.9, 1.2, 1.1]
    few = bench_stats.bootstrap([noisy], bench_stats.median)
    many = bench_stats.bootstrap([noisy * 8], bench_stats.median)
    assert few.low <= few.estimate == 1.1 <= few.high
    assert many.high - many.low < few.high - few.low


def test_a_goal_is_met_only_when_the_whole_interval_clears_it() -> None:
    interval = bench_stats.Interval(1.0, 0.9, 1.1)
    assert bench_stats.at_most(interval, 1.2) == "met"
    assert bench_stats.at_most(interval, 1.0) == "inconclusive"
    assert bench_stats.at_most(interval, 0.8) == "not met"
    assert bench_stats.at_least(interval, 0.8) == "met"
    assert bench_stats.at_least(interval, 1.0) == "inconclusive"
    assert bench_stats.at_least(interval, 1.2) == "not met"


def test_a_ratio_of_two_samples_resamples_each_on_its_own() -> None:
    ratio = bench_stats.bootstrap(
        [[2.0, 2.2, 1.8], [1.0, 1.1, 0.9]], lambda a, b: bench_stats.median(a) / bench_stats.median(b)
    )
    assert ratio.estimate == pytest.approx(2.0)
    assert ratio.low < 2.0 < ratio.high


def default_stack_run(server: float, joined: float, routes: float, relay: float, wall: float) -> dict[str, Any]:
    milestones = {"server_created": server, "routes_approved": routes, "relay_ready": relay}
    up = {"wall": wall, "cpu": 5.0, "joined": joined, "milestones": milestones}
    return {"preview": {"wall": 3.0, "cpu": 2.0}, "up": up, "destroy": {"wall": 20.0, "cpu": 3.0}, "load_before": 0.5}


def test_the_default_stack_bench_takes_the_vm_s_boot_out_of_the_program_s_share() -> None:
    # The VM boots for 100 s (server at 4 s, joined at 104 s); `up` ends 12 s after the join.
    runs = [default_stack_run(4.0, 104.0, 106.0, 114.0, wall) for wall in (116.0, 118.0, 130.0)]
    lines = bench_default_stack.report(runs)
    assert "  the program's own share of up: 18.0 s (goal <= 15 s: not met)" in lines
    assert any(
        line.startswith("  up beyond the VM's join, to the relay ready: 10.0 s (goal <= 30 s: met") for line in lines
    )
    assert any("the VM's boot to its join (Headscale)" in line and "100.0 s" in line for line in lines)
