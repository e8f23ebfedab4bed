"""The thread-scaling helper and the quiet profiler of ``bench deq``."""

import subprocess
import sys

import pytest
import torch

from formerlab.bench.threads import ThreadTimes, parse_threads, scaling_table, time_over_threads


def test_parse_threads():
    assert parse_threads("1,2") == (1, 2)
    assert parse_threads(" 4 ") == (4,)
    assert parse_threads(3) == (3,)
    for bad in ("0,1", "1,1", "one", "", "1,-2"):
        with pytest.raises(ValueError, match="--threads=.*distinct positive"):
            parse_threads(bad)


def test_every_method_runs_at_every_thread_count_and_the_count_is_restored():
    before = torch.get_num_threads()
    seen: dict[str, list[int]] = {"a": [], "b": []}
    steps = {name: (lambda n=name: seen[n].append(torch.get_num_threads())) for name in seen}
    times = time_over_threads(steps, (1, 2), warmup=1, repeats=3)
    assert torch.get_num_threads() == before
    for name in seen:  # 1 warm-up + 3 rounds at each count
        assert sorted(seen[name]) == [1] * 4 + [2] * 4
        assert set(times[name]) == {1, 2} and all(t >= 0 for t in times[name].values())
        for t in (1, 2):  # one time per round, the minimum reported
            assert len(times.rounds[name][t]) == 3 and times[name][t] == min(times.rounds[name][t])


def test_each_method_runs_first_at_a_thread_count_as_often_as_the_other():
    calls: list[tuple[str, int]] = []
    steps = {name: (lambda n=name: calls.append((n, torch.get_num_threads()))) for name in "ab"}
    time_over_threads(steps, (1, 2), warmup=0, repeats=4)
    firsts = [calls[i][0] for i in range(0, len(calls), 2)]  # the first of each pair
    assert sorted(firsts) == ["a"] * 4 + ["b"] * 4
    for t in (1, 2):  # at each count too
        assert sorted(calls[i][0] for i in range(0, len(calls), 2) if calls[i][1] == t) == ["a", "a", "b", "b"]


def test_paired_ratios_follow_the_rounds_not_the_minima():
    # the peer's luckiest round (18) is not ours' (10): minima say 1.80×, rounds 2.0, 1.5, 1.1
    times = ThreadTimes({"ours": {1: [10.0, 12.0, 30.0]}, "peer": {1: [20.0, 18.0, 33.0]}})
    assert times == {"ours": {1: 10.0}, "peer": {1: 18.0}}
    assert times.paired_ratios("peer", "ours", 1) == pytest.approx([2.0, 1.5, 1.1])
    table = scaling_table(times, "ours")
    assert "| peer | 18.0 | 1.80× | 1.50× (1.10–2.00) |" in table
    assert "| ours | 10.0 | 1.00× | 1.00× (1.00–1.00) |" in table


def test_scaling_table_ratios():
    table = scaling_table({"ours": {1: 10.0, 2: 5.0}, "peer": {1: 30.0, 2: 20.0}}, "ours")
    assert "| ours | 10.0 | 5.0 | 2.00× | 1.00× | 1.00× |" in table
    assert "| peer | 30.0 | 20.0 | 1.50× | 3.00× | 4.00× |" in table


def test_bench_deq_memory_profiling_prints_no_profiler_lines():
    code = (
        "import torch\n"
        "from formerlab.bench.deq import _cpu_peak_bytes\n"
        "x = torch.randn(64, 64, requires_grad=True)\n"
        "print('peak', _cpu_peak_bytes(lambda: (x @ x).sum().backward()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "peak" in proc.stdout
    assert "profiler_start" not in proc.stderr and "profiler_stop" not in proc.stderr
    assert "CPUAllocator" not in proc.stderr
