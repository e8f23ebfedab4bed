"""Data-parallel training: 2 gloo processes reproduce the 1-process run (CPU).

The multi-process tests launch real ranks (``distributed.launch``, what ``formerlab train
--nproc`` uses) on tiny models; each costs a few seconds of process start-up.
"""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from formerlab.data import IGNORE_INDEX, build
from formerlab.models import decoder
from formerlab.train import load_config, train
from formerlab.train.checkpoint import checkpoint_folder
from formerlab.train.distributed import Distributed, ShardDropout, launch
from formerlab.train.evaluate import task_loss

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def stored_losses(run_dir):
    state = json.loads((checkpoint_folder(run_dir) / "state.json").read_text())
    return [h["loss"] for h in state["history"] if "loss" in h]


def cli(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "formerlab", "train", *args], capture_output=True, text=True,
        timeout=timeout,
    )


# --- in one process: the pieces that make the ranks add up to one process ---------------
def test_shard_weights_make_the_rank_average_the_global_mean():
    """Ranks holding different numbers of target tokens still average to the global mean."""
    task = build("recall")
    gen = torch.Generator().manual_seed(0)
    batch = task.batch("train", 4, gen)
    batch.targets[0] = IGNORE_INDEX  # rank 0 (rows 0, 1) holds fewer target tokens
    logits = torch.randn(*batch.targets.shape, task.vocab_size, generator=gen)
    parts = [Distributed(r, 2).shard(batch, task) for r in range(2)]
    rows = batch.targets.shape[0] // 2
    weighted = [
        task_loss(logits[r * rows : (r + 1) * rows], part, task) * w
        for r, (part, w) in enumerate(parts)
    ]
    assert parts[0][1] < 1 < parts[1][1]
    torch.testing.assert_close(sum(weighted) / 2, task_loss(logits, batch, task))
    assert torch.equal(torch.cat([p.inputs for p, _ in parts]), batch.inputs)


def test_shard_dropout_masks_are_the_rows_of_the_one_process_mask():
    x = torch.randn(6, 5, 7)
    torch.manual_seed(3)
    whole = nn.Dropout(0.3).train()(x)
    halves = []
    for rank in range(3):
        torch.manual_seed(3)  # every rank shares the RNG state
        halves.append(ShardDropout(0.3, rank, 3).train()(x[2 * rank : 2 * rank + 2]))
    assert torch.equal(torch.cat(halves), whole)
    assert not torch.equal(halves[0] != 0, halves[1] != 0)  # ranks' masks differ
    assert torch.equal(ShardDropout(0.3, 0, 2).eval()(x), x)


def test_global_batch_must_split_evenly():
    with pytest.raises(ValueError, match=r"train.batch_size=5 .* divisible by .* \(2\)"):
        Distributed(0, 2).check(5)


# --- two real gloo ranks ------------------------------------------------------------------
RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from formerlab.train import Tracker, distributed, load_config, train
    import formerlab.train.loop as loop
    cases, out, fail = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3] == "fail"
    rank = int(os.environ["RANK"])
    if fail and rank == 1:  # rank 1's third loss raises
        real, calls = loop.task_loss, [0]
        def broken(*args):
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("injected fault in the loss")
            return real(*args)
        loop.task_loss = broken
    class Logged(Tracker):
        def __init__(self):
            self.metrics = {}
        def log_metrics(self, metrics, step):
            self.metrics.update(metrics)
    results = {}
    try:
        for name, case in cases.items():
            logged = Logged()
            r = train(load_config(None, case["overrides"]), tracker=logged, progress=False)
            results[name] = {"losses": [h["loss"] for h in r.history], "metrics": r.metrics,
                             "logged": logged.metrics}
        ddp = distributed.setup("cpu")
        results["mean_metrics"] = ddp.mean_metrics({"x": float(rank), "y": 2.0 * rank + 1})
    except Exception as error:
        print(distributed.record_failure(error), file=sys.stderr)
        sys.exit(1)
    if rank == 0:
        open(out, "w").write(json.dumps(results))
    # leave the group together, as the CLI does: a rank that exits while still in it can
    # be aborted by gloo's threads at teardown ("terminate called without an active
    # exception", seen once in CI)
    distributed.shutdown(sync=True)
""")


def run_ranks(tmp_path, cases, fail=False):
    """Run ``cases`` (name -> {"overrides": [...]}) in one 2-rank job; rank 0's results."""
    out = tmp_path / "results.json"
    command = [sys.executable, "-c", RANK_SCRIPT, json.dumps(cases), str(out),
               "fail" if fail else "ok"]
    code = launch(command, 2)
    return code, (json.loads(out.read_text()) if out.exists() else None)


def overrides_for(tmp_path, steps, extra=()):
    """conftest's tiny run (not importable from a module-scoped fixture), ``steps`` long."""
    return [
        "model.dim=32", "model.depth=1", "model.heads=2", "task.options.context=32",
        f"train.steps={steps}", "train.batch_size=4", "train.warmup=2", "train.eval_every=10",
        "train.eval_batches=2", "train.log_every=5", "sample.tokens=20",
        f"runs_dir={tmp_path / 'runs'}", "tracking=none", *extra,
    ]


CASES = {  # name -> (steps, overrides)
    "dropout": (20, ["model.dropout=0.1"]),
    "attention-causal_nystrom": (4, ["model.kernel=causal_nystrom"]),
    "attention-linear": (4, ["model.kernel=linear"]),
    "metric": (4, ["model.mixer=metric"]),
    "pooling": (4, ["model.mixer=pooling"]),
    "quadratic": (4, ["model.mixer=quadratic"]),
    # DEQ body, implicit (adjoint-solve) backward through DDP; tight solves so that the
    # shard's solver stops where the whole batch's does
    "deq-implicit": (4, ["model.deq={backward: implicit, jac_reg: 0.0, tol: 1.0e-7, "
                         "max_iter: 200, backward_tol: 1.0e-7, backward_max_iter: 200}"]),
    # DEQStack's default: + the Jacobian penalty (a double backward inside DDP's forward);
    # its random probes have the shard's shape, so only "it trains" is checked
    "deq-default": (4, ["model.deq={}"]),
}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One 2-rank job over every case (process start-up is the slow part)."""
    tmp = tmp_path_factory.mktemp("ddp")
    cases = {n: {"overrides": overrides_for(tmp / n, s, extra)} for n, (s, extra) in CASES.items()}
    code, results = run_ranks(tmp, cases)
    assert code == 0
    return cases, results


def one_process(case):
    return train(load_config(None, case["overrides"]), progress=False)


def test_two_processes_reproduce_the_one_process_losses_with_dropout(job):
    cases, results = job
    one = one_process(cases["dropout"])
    got = results["dropout"]
    assert len(got["losses"]) == 20
    assert got["losses"] == pytest.approx([h["loss"] for h in one.history], abs=1e-5)
    assert got["metrics"] == pytest.approx(one.metrics, abs=1e-5)  # evaluation over ranks


@pytest.mark.parametrize("name", [n for n in CASES if n not in ("dropout", "deq-default")])
def test_every_mixer_and_the_implicit_deq_train_the_same_on_two_ranks(job, name, monkeypatch):
    cases, results = job
    if name.startswith("deq"):  # its sample is generated without a cache, and it says so
        # the warning is once per process: forget earlier tests' warnings
        monkeypatch.setattr(decoder, "_WARNED", set())
        with pytest.warns(RuntimeWarning, match="DEQStack cannot stream its state"):
            one = one_process(cases[name])
    else:
        one = one_process(cases[name])
    assert results[name]["losses"] == pytest.approx([h["loss"] for h in one.history], abs=1e-5)
    if name.startswith("deq"):  # the adjoint solves ran, and their statistics were logged
        assert results[name]["logged"]["diag/deq_backward_iterations"] >= 1


def test_the_default_deq_with_jacobian_penalty_trains_under_ddp(job):
    _, results = job
    losses = results["deq-default"]["losses"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert results["deq-default"]["logged"]["diag/deq_jac_loss"] > 0


def test_metrics_are_averaged_over_ranks_and_logged_by_rank_0_only(job):
    _, results = job
    assert results["mean_metrics"] == {"x": 0.5, "y": 2.0}
    assert results["dropout"]["logged"]["train/loss"] > 0  # rank 0's tracker got them


def test_resume_under_ddp_from_the_command_line(tiny, tmp_path):
    """10 steps in one process, the next 10 with ``formerlab train --resume ... --nproc 2``,
    tracked by MLflow (rank 0 alone opens the store)."""
    overrides = tiny(20) + ["model.dropout=0.1", "tracking=mlflow"]
    straight = train(load_config(None, overrides), run_dir=tmp_path / "straight", progress=False)
    train(load_config(None, overrides), run_dir=tmp_path / "split", stop_after=10, progress=False)
    resumed = cli("--resume", str(tmp_path / "split"), "--nproc", "2", "--no-progress")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    expected = [h["loss"] for h in straight.history]
    assert stored_losses(tmp_path / "split") == pytest.approx(expected, abs=1e-5)
    assert f"loss {straight.metrics['loss']:.4f}" in resumed.stdout  # rank 0 reports
    assert resumed.stdout.count("validation") == 1  # once, not once per rank
    assert "mlflow.db" in resumed.stdout.replace("\n", "") and "run id" in resumed.stdout


def test_a_failing_rank_stops_the_job_naming_rank_and_error(tmp_path, capfd):
    cases = {"softmax": {"overrides": overrides_for(tmp_path, 20)}}
    code, results = run_ranks(tmp_path, cases, fail=True)
    err = capfd.readouterr().err
    assert code == 1 and results is None
    assert "rank 1 of 2 failed: RuntimeError: injected fault in the loss" in err.splitlines()[-1]
