"""The Nyström speed benchmark runs end to end (no timed assertions)."""

import pytest
from typer.testing import CliRunner

from formerlab.bench.measure import FewRepeatsWarning
from formerlab.bench.nystrom import (
    Result,
    markdown_table,
    measure_memory,
    summary_rows,
    time_interleaved,
)
from formerlab.cli import app


def test_interleaved_timing_memory_and_table():
    times = time_interleaved(("nystrom", "softmax"), 96, 1, 32, 2, 8, 5, 0, 2, "cpu")
    assert set(times) == {"nystrom", "softmax"} and all(t > 0 for t in times.values())
    assert measure_memory("nystrom", 96, 1, 32, 2, 8, 5, 1, "cpu") is not None
    r = Result("nystrom", 96, times["nystrom"], 1.0)
    rows = summary_rows([r, Result("softmax", 96, 2 * r.time_ms, 1.0)])
    assert rows[0]["softmax/nystrom time"] == pytest.approx(2.0)
    table = markdown_table([r, Result("nystrom-attention", 96, None, None, "not installed")])
    assert "not installed" in table


def test_cli_bench_nystrom_one_case():
    with pytest.warns(FewRepeatsWarning, match="repeats=1"):
        res = CliRunner().invoke(app, ["bench", "nystrom", "--size", "64", "--method",
                                       "nystrom", "--warmup", "0", "--repeats", "1",
                                       "--landmarks", "8", "--markdown"])
    assert res.exit_code == 0, res.output
    assert "| 64 |" in res.output
