"""Parameter tables (library and `formerlab params`), `formerlab mixers list`, `bench metric`."""

import pytest
from typer.testing import CliRunner

from formerlab import mixers
from formerlab.bench.measure import FewRepeatsWarning
from formerlab.cli import app
from formerlab.mixers.params import count_parameters, parameter_table

runner = CliRunner()
WIDE = {"COLUMNS": "200"}


def test_parameter_table_counts_every_mixer_and_variant():
    dim, heads = 64, 4
    rows = parameter_table(dim, heads, mixer_options={"quadratic": {"rank": 2}})
    assert {r.mixer for r in rows} == set(mixers.available())
    by = {(r.mixer, r.label()): r for r in rows}
    for name, options in [("attention", {}), ("pooling", {}), ("quadratic", {"rank": 2}),
                          *(("metric", {"metric": m}) for m in ("symmetric", "psd", "diagonal"))]:
        label = ", ".join(f"{k}={v}" for k, v in options.items())
        want = count_parameters(mixers.build(name, dim=dim, heads=heads, **options))
        assert by[(name, label)].params == want
    attention = by[("attention", "")].params
    assert by[("metric", "metric=symmetric")].ratio == by[("metric", "metric=symmetric")].params / attention
    assert by[("attention", "")].ratio == 1.0


def test_parameter_table_reports_unbuildable_options_instead_of_crashing():
    rows = parameter_table(16, 2, mixer_options={"metric": {"metrc": "psd"}})
    bad = [r for r in rows if r.error]
    # the configured (bad) options reach the metric row and each metric variant
    assert {r.mixer for r in bad} == {"metric"} and len(bad) == 4
    assert all("metrc" in r.error and r.params is None for r in bad)
    assert all(r.params is not None for r in rows if r.mixer != "metric")


def test_params_command_prints_half_for_metric():
    result = runner.invoke(app, ["params", "--set", "model.dim=128", "--set", "model.heads=4"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "65,664" in result.output and "35,008" in result.output and "0.533" in result.output
    bad = runner.invoke(app, ["params", "--set", "model.mixer=metric",
                              "--set", "model.mixer_options.metrc=psd"], env=WIDE)
    assert bad.exit_code == 2 and "metrc" in bad.output


def test_mixers_list_command():
    result = runner.invoke(app, ["mixers", "list"], env=WIDE)
    assert result.exit_code == 0, result.output
    for name in mixers.available():
        assert name in result.output


def test_bench_metric_command_runs_and_reports_skips():
    with pytest.warns(FewRepeatsWarning, match="repeats=1"):
        result = runner.invoke(app, ["bench", "metric", "--size", "8", "--batch", "1",
                                     "--heads", "2", "--head-dim", "4", "--warmup", "0",
                                     "--repeats", "1", "--max-materialised-gib", "1e-9",
                                     "--markdown", "--method", "metric", "--method",
                                     "materialised"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "materialised" in result.output and "skipped: needs" in result.output
    assert "| 8 |" in result.output
    bad = runner.invoke(app, ["bench", "metric", "--method", "fast"], env=WIDE)
    assert bad.exit_code == 2 and "methods='fast'" in bad.output
