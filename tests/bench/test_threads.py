"""The thread-scaling helper and the quiet profiler of ``bench deq``."""

import subprocess
import sys

import pytest
import torch

from formerlab.bench.threads import parse_threads, scaling_table, time_over_threads


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
