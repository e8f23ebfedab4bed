"""The ``formerlab`` command. Sub-commands are thin: they parse, then call into the library.

One module per command group; this one builds ``app`` from them:

* :mod:`~formerlab.cli.common`: the console, ``fail()``, the ``EXIT_*`` codes, shared
  options (``--set``, ``--threads``, ``--format``) and the one table writer;
* :mod:`~formerlab.cli.train`: ``train``, ``generate``;
* :mod:`~formerlab.cli.registries`: ``attention|mixers|solvers|tasks list|describe``;
* :mod:`~formerlab.cli.bench`: ``bench ...``;
* :mod:`~formerlab.cli.studies`: ``params``, ``pinv-study``, ``approx``, ``viz attention``;
* :mod:`~formerlab.cli.sweeps`: ``ablate``, ``report``, ``runs``;
* :mod:`~formerlab.cli.linearize`: ``linearize``, ``linearize-base``.
"""

from __future__ import annotations

import typer

from formerlab.cli import bench, linearize, registries, studies, sweeps, train
from formerlab.cli.common import (  # noqa: F401 - re-exported: formerlab.cli.EXIT_* and fail
    EXIT_INTERRUPTED,
    EXIT_TRIALS_FAILED,
    EXIT_USAGE,
    console,
    fail,
)

app = typer.Typer(
    help="formerlab: efficient and implicit Transformer layers, and a workbench to compare them.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

app.command()(train.train)
app.command()(train.generate)
app.command()(studies.params)
app.command()(sweeps.ablate)
app.command()(sweeps.report)
app.command()(sweeps.runs)
app.command("pinv-study")(studies.pinv_study)
app.command("approx")(studies.approx)
app.command()(linearize.linearize)
app.command("linearize-base")(linearize.linearize_base)
app.add_typer(registries.attention_app, name="attention")
app.add_typer(bench.bench_app, name="bench")
app.add_typer(registries.mixers_app, name="mixers")
app.add_typer(registries.solvers_app, name="solvers")
app.add_typer(registries.tasks_app, name="tasks")
app.add_typer(studies.viz_app, name="viz")


def main() -> None:  # pragma: no cover - console-script entry
    app()

