"""The pinv study shows the global-init failure, per-matrix convergence and the auto choice."""

from typer.testing import CliRunner

from formerlab.bench.pinv_study import auto_evidence, run_pinv_study, study_matrices
from formerlab.cli import app


def test_per_matrix_inits_converge_and_global_needs_far_more_matmuls():
    messages = []
    rows = run_pinv_study(sizes=(3, 24), kind="random", batch=3, orders=(3,), progress=messages.append)
    assert messages == ["size 3", "size 24"]
    for r in rows:
        assert r.converged == r.total, r
        assert r.error <= r.bound <= 1e-8  # certified against torch.linalg.pinv
    ev = auto_evidence(rows)
    assert ev["global"][0] > 1.5 * ev["razavi"][0]  # mixed scales stall the global init
    glob6 = [r.error_at_6 for r in rows if r.init == "global" and r.size == 24]
    assert glob6[0] > 0.99


def test_auto_is_within_10_percent_of_the_best_safe_init_on_both_kinds():
    # the README's claim for the auto choice (within 2 % on the full study), on a small
    # version of the measurement, where the spread between inits is larger
    for kind in ("random", "softmax"):
        rows = run_pinv_study(sizes=(8, 24), kind=kind, batch=3, orders=(3, 7),
                              inits=("razavi", "frobenius", "auto"))
        ev = auto_evidence(rows)
        best = min(ev[i][0] for i in ("razavi", "frobenius"))
        assert ev["auto"][0] <= 1.10 * best, (kind, ev)
        assert ev["auto"][1] == max(ev[i][1] for i in ev)  # as many cases fully converged


def test_softmax_kind_and_matrices():
    A = study_matrices("softmax", 10, 3)
    assert A.shape == (3, 10, 10)
    assert (A.sum(-1) - 1).abs().max() < 1e-12
    rows = run_pinv_study(sizes=(10,), kind="softmax", batch=2, inits=("auto",), orders=(2, 7))
    assert all(r.converged == r.total and r.error <= r.bound for r in rows)


def test_cli_pinv_study():
    res = CliRunner().invoke(app, ["pinv-study", "--sizes", "4", "--batch", "2", "--markdown"])
    assert res.exit_code == 0, res.output
    assert "converged in" in res.output and "global" in res.output
    bad = CliRunner().invoke(app, ["pinv-study", "--kind", "hilbert"])
    assert bad.exit_code != 0 and "kind" in bad.output
