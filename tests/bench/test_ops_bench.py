"""``formerlab bench ops``: every form runs, computes the intended map, and is reported
(no timing assertions).

Ground truth: the gated delta recurrence ``S_t = a_t (I - b_t k_t k_t^T) S_{t-1} +
b_t k_t v_t^T``, ``o_t = scale * S_t^T q_t`` written below in float64, token by token; every
mechanism of the benchmark is a special case of it (no ``b``: a plain gated write;
Mamba-2: ``q = C``, ``k = B``, ``v = dt * x``, log decay ``dt * A``, scale 1).
"""

import importlib.metadata
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from formerlab.attention.functional import retention_log_decay
from formerlab.bench import ops
from formerlab.cli import app

F64 = torch.float64
SMALL = {"batch": 1, "heads": 2, "head_dim": 32}


def reference(q, k, v, log_decay=None, beta=None, scale=None):
    """The gated (delta) recurrence in float64; ``log_decay`` ``[B, T, H]`` or per key
    ``[B, T, H, K]``, ``beta`` ``[B, T, H]`` (None: a plain additive write)."""
    q, k, v = (t.detach().to(F64) for t in (q, k, v))
    batch, seq_len, heads, key_dim = q.shape
    scale = key_dim**-0.5 if scale is None else scale
    state = torch.zeros(batch, heads, key_dim, v.shape[-1], dtype=F64)
    outputs = []
    for t in range(seq_len):
        if log_decay is not None:
            a = log_decay[:, t].detach().to(F64).exp()
            state = state * (a.unsqueeze(-1) if a.dim() == 3 else a[..., None, None])
        k_t, v_t = k[:, t], v[:, t]
        if beta is not None:
            b = beta[:, t].detach().to(F64)[..., None]
            v_t = b * (v_t - torch.einsum("bhk,bhkv->bhv", k_t, state))
        state = state + torch.einsum("bhk,bhv->bhkv", k_t, v_t)
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outputs, dim=1)


def expected(mechanism, x):
    """What every form of ``mechanism`` must compute on the benchmark's inputs ``x``."""
    q, k, v = x["q"], x["k"], x["v"]
    if mechanism == "retention":
        batch, seq_len, heads = q.shape[:3]
        gamma = retention_log_decay(heads).expand(batch, seq_len, heads)
        return reference(q, k, v, gamma)
    if mechanism in ("simple_gla", "gla"):
        return reference(q, k, v, x["g"])
    if mechanism in ("deltanet", "gated_deltanet"):
        unit = [F.normalize(t.detach().to(F64), dim=-1) for t in (q, k)]
        return reference(*unit, v, x.get("g"), x["beta"])
    dt = x["dt"].detach().to(F64)  # mamba2
    return reference(q, k, v.detach().to(F64) * dt[..., None], dt * x["A"].detach(), scale=1.0)


@pytest.fixture
def fresh_peers():
    """Forget the loaded fla modules before and after (a test may hide fla-core)."""
    ops.load_fla_naive.cache_clear()
    yield
    ops.load_fla_naive.cache_clear()


@pytest.mark.parametrize("mechanism", ops.MECHANISMS)
def test_every_form_computes_the_mechanism_on_the_bench_inputs(mechanism):
    """Ours, fla's reference and the recurrence, with the gates in their argument slots,
    against the float64 recurrence (two chunks and a bit: N = 150)."""
    pytest.importorskip("einops")
    x = ops.make_inputs(mechanism, 1, 150, 2, 8, seed=3)
    truth = expected(mechanism, x)
    runs = ops.forms(mechanism, x)
    for form in ops.FORMS:
        try:
            out = runs[form]()
        except ops.PeerUnavailable as why:  # gla (no fla chunked GLA), deltanet (N % 64)
            assert form == "fla" and mechanism in ("gla", "deltanet"), why
            continue
        err = (out.detach().to(F64) - truth).abs().max() / truth.abs().max()
        assert err < 1e-5, (mechanism, form, float(err))


def test_fla_peer_runs_the_delta_rule_at_multiples_of_the_chunk():
    pytest.importorskip("einops")
    x = ops.make_inputs("deltanet", 1, 128, 2, 8, seed=4)
    out = ops.fla_reference("deltanet", x)
    err = (out.detach().to(F64) - expected("deltanet", x)).abs().max()
    assert err < 1e-5
    with pytest.raises(ops.PeerUnavailable, match="N % 64"):
        ops.fla_reference("deltanet", ops.make_inputs("deltanet", 1, 96, 2, 8))


def test_inputs_are_in_their_documented_ranges():
    x = ops.make_inputs("mamba2", 2, 500, 3, 4, seed=1)
    assert x["dt"].min() >= 1e-3 * (1 - 1e-6) and x["dt"].max() <= 1e-1 * (1 + 1e-6)
    assert x["A"].shape == (3,) and x["A"].min() >= -16 and x["A"].max() <= -1
    y = ops.make_inputs("gated_deltanet", 2, 500, 3, 4, seed=1)
    assert y["beta"].shape == (2, 500, 3) and 0 < y["beta"].min() and y["beta"].max() < 1
    assert y["g"].max() < 0 and math.exp(float(y["g"].detach().mean())) == pytest.approx(
        0.98, abs=0.02
    )
    assert ops.make_inputs("gla", 1, 5, 3, 4)["g"].shape == (1, 5, 3, 4)
    assert all(t.requires_grad and t.is_leaf for t in x.values())
    assert set(ops.make_inputs("retention", 1, 5, 3, 4)) == {"q", "k", "v"}


@pytest.mark.parametrize("mechanism", ops.MECHANISMS)
def test_the_streaming_step_continues_the_chunked_output(mechanism):
    """The step benchmarked (recurrence on one token from the chunked op's state) gives
    the output the chunked op gives that token in the whole sequence."""
    x = ops.make_inputs(mechanism, 1, 71, 2, 8, seed=5, requires_grad=False)
    whole = ops.chunked(mechanism, x)
    state = ops.context_state(mechanism, ops.time_slice(x, 0, 70))
    out, new_state = ops.stream_step(mechanism, ops.time_slice(x, 70, 71), state)
    torch.testing.assert_close(out[:, 0], whole[:, 70], rtol=1e-5, atol=1e-5)
    assert new_state.shape == state.shape == (1, 2, 8, 8)


def test_saved_bytes_counts_saved_storages_once_and_not_the_inputs():
    x = {"q": torch.randn(10, 100, requires_grad=True), "k": torch.randn(10, 100)}
    # exp saves its result (4000 bytes); q * k saves q and k, which are inputs
    assert ops.saved_bytes(lambda: (x["q"] * 2).exp(), x) == 4000
    assert ops.saved_bytes(lambda: x["q"] * x["k"], x) == 0
    y = (x["q"] * 2).exp()  # the same storage saved twice counts once
    assert ops.saved_bytes(lambda: y[:5].sin() + y[5:].sin(), x) == 4000


def test_a_tiny_run_measures_every_form_and_memory_is_linear_without_token_states():
    pytest.importorskip("einops")
    with pytest.warns(UserWarning, match="rounds=1"):
        results = ops.run_benchmark(n=64, rounds=1, warmup=0, threads=(1,),
                                    memory_sizes=(128, 256), **SMALL)  # fmt: skip
    assert [r.mechanism for r in results] == list(ops.MECHANISMS)
    state = SMALL["heads"] * SMALL["head_dim"] ** 2 * 4
    for r in results:
        assert r.times["ours"][1] > 0 and r.times["recurrent"][1] > 0
        assert r.agrees == {f: True for f in r.diff} and r.diff["recurrent"] < 1e-3
        if r.mechanism == "gla":
            assert r.skipped == {"fla": "fla has no naive chunked GLA"}
        else:
            assert r.times["fla"][1] > 0 and r.diff["fla"] < 1e-3
        chunked, token_by_token = r.saved["ours"], r.saved["recurrent"]
        # the recurrence keeps at least one [K, V] state per token; the chunked op less
        # (at this tiny K = V = 32; the gap grows with K * V)
        assert token_by_token[256] >= 256 * state
        assert chunked[256] < token_by_token[256] / 2
        for saved in (chunked, token_by_token):  # linear in N: twice the tokens, ~twice
            assert 1.8 < saved[256] / saved[128] < 2.2, (r.mechanism, saved)
    rows = ops.time_rows(results)
    assert rows[0]["mechanism"] == "retention" and rows[0]["threads"] == "1"
    assert {"ours ms", "fla naive / ours", "recurrent / ours", "max |diff| vs fla"} <= set(rows[0])
    assert rows[2]["fla naive ms"] == "fla has no naive chunked GLA"
    memory = ops.memory_rows(results)
    assert [(m["mechanism"], m["N"]) for m in memory[:2]] == [
        ("retention", "128"),
        ("retention", "256"),
    ]


@pytest.mark.filterwarnings("ignore:rounds=1 is too few")
def test_a_disagreeing_peer_is_flagged(monkeypatch):
    """The agreement check is real: a peer off by 1 % is reported, not timed silently."""
    name, right = ops._FLA["simple_gla"]
    monkeypatch.setitem(
        ops._FLA, "simple_gla", (name, lambda x: 1.01 * ops.chunked("simple_gla", x))
    )
    with pytest.warns(UserWarning, match="differ by"):
        [result] = ops.run_benchmark(n=64, mechanisms=("simple_gla",), rounds=1, warmup=0,
                                     threads=(1,), memory_sizes=(), recurrent_form=False,
                                     **SMALL)  # fmt: skip
    assert result.agrees == {"fla": False}
    assert ops.time_rows([result])[0]["max |diff| vs fla"].endswith("(> tolerance!)")
    assert result.skipped["recurrent"].startswith("not run")


def test_without_fla_core_the_peer_cells_say_so(monkeypatch, fresh_peers):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.warns(UserWarning, match="rounds=1"):
        [result] = ops.run_benchmark(n=64, mechanisms=("deltanet",), rounds=1, warmup=0,
                                     threads=(1,), memory_sizes=(), **SMALL)  # fmt: skip
    assert result.skipped == {"fla": "fla-core not installed"}
    row = ops.time_rows([result])[0]
    assert row["fla naive ms"] == "fla-core not installed" and row["max |diff| vs fla"] == "–"
    assert row["recurrent ms"] != "–"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mechanisms": ("nope",)}, "mechanisms='nope'"),
        ({"mechanisms": ()}, "mechanisms=()"),
        ({"n": 0}, "n=0"),
        ({"rounds": 0}, "rounds=0"),
        ({"memory_sizes": (0,)}, "memory_sizes=0"),
        ({"tolerance": -1.0}, "tolerance"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        ops.run_benchmark(**kwargs)


@pytest.mark.parametrize("fmt", ["table", "markdown", "csv"])
def test_cli_prints_both_tables(fmt):
    pytest.importorskip("einops")
    args = ["bench", "ops", "--size", "64", "--mechanism", "retention", "--heads", "2",
            "--head-dim", "8", "--rounds", "1", "--warmup", "0", "--threads", "1",
            "--memory-size", "64", "--format", fmt]  # fmt: skip
    with pytest.warns(UserWarning, match="rounds=1"):
        res = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    if fmt == "csv":
        lines = res.stdout.splitlines()
        assert lines[0].startswith("mechanism,ours,threads,ours ms,fla naive ms")
        assert lines[1].startswith("retention,chunk_retention,1,")
        assert any(line.startswith("mechanism,N,chunked saved MiB") for line in lines)
    else:
        assert "chunk_retention" in res.output and "max |diff| vs fla" in res.output
        assert "chunked saved MiB" in res.output
    if fmt == "markdown":
        assert "| retention | chunk_retention | 1 |" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mechanism", "nope"], "mechanisms='nope' is not allowed"),
        (["--threads", "0"], "--threads='0' is not allowed"),
        (["--memory-size", "0"], "memory_sizes=0 is not allowed"),
        (["--format", "pdf"], "pdf"),
    ],
)
def test_cli_bad_options_are_usage_errors(args, message):
    res = CliRunner().invoke(app, ["bench", "ops", "--size", "64", *args],
                             env={"COLUMNS": "250"})  # fmt: skip
    assert res.exit_code == 2
    assert message in " ".join(res.output.split())
