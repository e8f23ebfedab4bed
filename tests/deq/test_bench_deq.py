"""The DEQ benchmark's measurements at toy size: memory facts (no timing assertions)."""

from __future__ import annotations

import pytest

from formerlab.bench.deq import memory_comparison, memory_table, solver_comparison, solver_table
from formerlab.bench.measure import FewRepeatsWarning


def test_memory_comparison_deq_flat_in_iterations_explicit_grows_with_depth():
    rows = {r.body: r for r in memory_comparison(dim=32, seq=16, batch=2, depths=(2, 4))}
    ten, thirty = rows["DEQ implicit, 10 iterations"], rows["DEQ implicit, 30 iterations"]
    assert ten.info["deq_iterations"] == 10 and thirty.info["deq_iterations"] == 30
    assert ten.saved_mib == thirty.saved_mib
    # equal up to the per-iteration residual trace: B floats per iteration
    assert abs(ten.peak_mib - thirty.peak_mib) * 2**20 < 1024
    two, four = rows["explicit 2 blocks"], rows["explicit 4 blocks"]
    assert four.saved_mib > 1.8 * two.saved_mib
    assert rows["DEQ implicit (anderson, tol 1e-3)"].saved_mib < two.saved_mib
    assert "explicit 4 blocks" in memory_table(list(rows.values()))


def test_solver_comparison_reports_every_solver():
    with pytest.warns(FewRepeatsWarning, match="repeats=1"):
        rows = solver_comparison(
            dim=32, seq=8, batch=2, gains=(1.0,), repeats=1, compare_torchdeq=False
        )
    assert [r.solver for r in rows] == ["fixed_point", "anderson", "broyden"]
    for r in rows:
        assert r.converged == 1.0 and r.residual_max <= 1e-3
        assert r.evaluations == r.iterations_max + 1
    assert "| 1 | formerlab | broyden |" in solver_table(rows)
