"""The approximation study covers the whole registry and reads trained checkpoints."""

import math

from typer.testing import CliRunner

from formerlab import attention
from formerlab.bench.approx import checkpoint_qkv, iteration_curve, run_approx, synthetic_qkv
from formerlab.cli import app


def small(**kw):
    return run_approx(n=64, landmarks=8, head_dim=8, heads=2, scales=(1.0,), data=("smooth",),
                      curve_iters=25, **kw)


def test_every_registered_kernel_is_compared_noncausal_and_causal():
    rep = small()
    names = {r.kernel.split(" ")[0] for r in rep.rows}
    assert names == set(attention.available()) - {"softmax"}
    by = {r.kernel: r for r in rep.rows}
    for label in ("nystrom (6 iters)", "nystrom (exact pinv)", "landmark"):
        assert math.isfinite(by[label].output_error) and math.isfinite(by[label].weights_error)
    causal = small(causal=True)
    assert {r.kernel for r in causal.rows} == set(attention.available(causal=True)) - {"softmax"}
    assert not causal.curves  # the pinv curve is a non-causal study


def test_curve_ends_at_the_exact_pinv_error():
    data = synthetic_qkv(64, 8, 2, 1, 1.0, "smooth", seed=0)
    curve = iteration_curve(data, 8, max_iter=40)
    rep = small()
    exact_err = next(r.output_error for r in rep.rows if r.kernel == "nystrom (exact pinv)")
    assert abs(curve.errors[-1] - exact_err) <= 1e-3 * max(1.0, exact_err)
    assert len(curve.errors) == 41 and curve.errors[curve.best_iteration] == min(curve.errors)


def test_checkpoint_qkv_from_a_trained_run(tiny, tmp_path):
    from formerlab.train import load_config, train

    result = train(load_config(None, tiny(4)), run_dir=tmp_path / "run", progress=False)
    layers = checkpoint_qkv(str(result.run_dir), batch_size=2)
    assert len(layers) == 1  # depth 1
    q = layers[0].q
    assert q.shape == (2, 2, 32, 16)  # batch, heads, context, dim/heads
    rep = run_approx(landmarks=8, checkpoint=str(result.run_dir), batch=2, curve_iters=5)
    assert rep.settings["n"] == 32
    assert all(r.source.endswith("mixer") for r in rep.rows)


def test_cli_approx_prints_every_kernel():
    res = CliRunner().invoke(app, ["approx", "--n", "48", "--landmarks", "8", "--data", "smooth",
                                   "--scale", "1", "--heads", "1", "--head-dim", "8", "--markdown",
                                   "--curve-iters", "5"])
    assert res.exit_code == 0, res.output
    for name in set(attention.available()) - {"softmax"}:
        assert name in res.output
    assert "by pinv iteration" in res.output
    bad = CliRunner().invoke(app, ["approx", "--data", "noise"])
    assert bad.exit_code != 0 and "data" in bad.output
