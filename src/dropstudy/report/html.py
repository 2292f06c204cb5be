"""report.html: the comparison of a report or a study as one self-contained page, for a browser
without any W&B server.

The page holds the report's tables (the same rounded cells as report.md), the figures inlined as
SVG, each setting's (arm's) learning curves, the runs' provenance and the commands that made
them. It makes no request of its own: no script, stylesheet, font or image from anywhere, so it
opens from a file, offline, on a phone, and prints. The figures come from dropstudy's own figure
code; this module only gathers what the page shows and renders `templates/report.html.j2`.
"""

from __future__ import annotations

import re
import shlex
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from dropstudy.report import plots
from dropstudy.report.tables import (
    ExperimentTable,
    Report,
    Run,
    add_comparisons,
    build_tables,
    caption,
    cells,
    find_runs,
    header,
    seed_values,
    table_rows,
)
from dropstudy.store.rundir import RunDir, RunDirError

PAGE = "report.html"

# Captions of the figures the page knows, by the end of the figure's name.
CAPTIONS = {
    "vs_dropout": "Final metrics against the dropout rate: mean over seeds with its 95% interval.",
    "learning_curves": "Learning curves of every setting: mean over seeds with its 95% band.",
    "fit": "The regression fit of each setting (one seed each) over the training and test points.",
    "study_curves": "Every arm's training and validation curves on shared axes.",
    "weight_norms": "The weights' L2 norms per arm: per layer at the end, and over training.",
}
# The curves of one arm: training mode (dropout on), the training data in eval mode (dropout
# off; absent in runs made before it was logged), and validation.
ARM_CURVES = (("train", "train (dropout on)", "-"), ("train_eval", "train (eval mode)", "-."),
              ("val", "validation", "--"))


@dataclass
class Figure:
    anchor: str
    caption: str
    svg: Markup

    @property
    def wide(self) -> bool:
        """Drawn wider than one column (side-by-side panels): given a row of the page to itself."""
        width = re.search(r'<svg[^>]*\bwidth="([0-9.]+)pt"', self.svg)
        return width is not None and float(width.group(1)) > 400


def inline_svg(markup: str, prefix: str) -> Markup:
    """An SVG file as markup to put inside HTML: from its <svg> tag on (no XML prolog or doctype,
    which names a DTD on the web; no metadata), with every id prefixed, since matplotlib names the
    parts of each figure alike (`figure_1`, `axes_1`) and ids must be unique in a page."""
    svg = markup[markup.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    return Markup(re.sub(r'(\bid="|href="#|url\(#)', rf"\g<1>{prefix}-", svg))


def _caption(name: str) -> str:
    ends = [end for end in CAPTIONS if name.endswith(end)]
    return CAPTIONS[max(ends, key=len)] if ends else name.replace("_", " ")


def _anchor(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


def figure_of(name: str, svg_path: Path) -> Figure:
    anchor = f"fig-{_anchor(name)}"
    return Figure(anchor, _caption(name), inline_svg(svg_path.read_text(), anchor))


def _mean_curve(per_run: list[list[dict]], metric: str, label: str, style: str) -> plots.SeedStats | None:
    """`metric` over the runs at the epochs every run logged it (plots draws its centre and 95% band)."""
    epochs, samples = seed_values(per_run, metric)
    if not epochs:
        return None
    return plots.SeedStats(label, epochs, samples, style,
                           plots.COLORS[[c[0] for c in ARM_CURVES].index(metric.split("/")[0])])


def arms_figure(table: ExperimentTable, folder: Path) -> Figure | None:
    """Each setting's learning curves in its own panel (mean over its seeds), stacked in one
    column by plots.mean_learning_curves: one figure, so the page draws one per experiment."""
    panels: dict[str, list[plots.SeedStats]] = {}
    for row in table.rows:
        per_run = [run.rows() for run in row.runs]
        for unit, ylabel in (("loss", f"loss ({table.loss})"), ("acc", "accuracy")):
            curves = [_mean_curve(per_run, f"{split}/{unit}", label, style) for split, label, style in ARM_CURVES]
            if any(curves):
                panels[f"{row.label}: {ylabel}"] = [c for c in curves if c is not None]
    if not panels:
        return None
    counts = sorted({len(row.runs) for row in table.rows})
    seeds = "one seed" if counts == [1] else f"{counts[0]}" + (f"-{counts[-1]}" if len(counts) > 1 else "") + " seeds"
    path = plots.mean_learning_curves(panels, "epoch", folder / f"{table.experiment}_arms.svg", seeds)
    figure = figure_of(f"{table.experiment}_arms", path.with_suffix(".svg"))
    figure.caption = (f"{table.experiment}: each setting's learning curves, "
                      + ("one seed each." if counts == [1] else f"mean over {seeds} with its 95% band."))
    return figure


# --------------------------------------------------------------------------- provenance and commands


def _counted(values: list[Any]) -> str:
    """One value, or each distinct one with how many runs had it."""
    counts = Counter("unknown" if v is None else str(v) for v in values)
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{value} ({n} of {len(values)} runs)" for value, n in counts.most_common())


def _dirty(git: dict) -> str:
    if git.get("dirty") is None:
        return "unknown (not run from a git checkout)"
    return "yes: uncommitted changes, saved as git.diff in each run dir" if git["dirty"] else "no"


def _provenance(run: Run) -> dict[str, Any]:
    """The run's provenance.json; a damaged one shows as unknown (report names it when it reads
    the runs) instead of stopping the page."""
    try:
        return RunDir(run.path).read_provenance()
    except RunDirError:
        return {}


def provenance_rows(runs: Sequence[Run]) -> list[tuple[str, str]]:
    """What produced the runs (their provenance.json), field by field."""
    if not runs:
        return [("runs", "none finished")]
    records = [_provenance(run) for run in runs]
    fields: dict[str, Callable[[dict], Any]] = {
        "runs": lambda p: None,
        "git commit": lambda p: (p.get("git") or {}).get("commit"),
        "uncommitted changes": lambda p: _dirty(p.get("git") or {}),
        "device": lambda p: p.get("device"),
        "host": lambda p: p.get("host"),
        "platform": lambda p: p.get("platform"),
        "data": lambda p: p.get("data"),
        "data sha256": lambda p: p.get("data_sha256"),
    }
    rows = [(name, str(len(runs)) if name == "runs" else _counted([get(p) for p in records]))
            for name, get in fields.items()]
    packages = list(dict.fromkeys(k for p in records for k in (p.get("versions") or {})))
    rows += [(f"version: {name}", _counted([(p.get("versions") or {}).get(name) for p in records])) for name in packages]
    return rows


def run_commands(runs: Sequence[Run]) -> list[str]:
    """The distinct command lines that started (or resumed) the runs, in the order first seen."""
    records = [_provenance(run) for run in runs]
    commands = [p.get("command") for p in records] + [r.get("command") for p in records for r in p.get("resumed", [])]
    return list(dict.fromkeys(c for c in commands if c))


def report_command(root: Path, baseline: Sequence[str] = ()) -> str:
    return shlex.join(["dropstudy", "report", str(root.resolve()), *(f"--baseline={b}" for b in baseline)])


# --------------------------------------------------------------------------- the page


def _table(table: ExperimentTable) -> dict[str, Any]:
    columns = header(table)
    rows, previous = [], None
    for metric, row in table_rows(table):
        rows.append({"cells": cells(table, metric, row), "first": metric != previous, "baseline": row.is_baseline})
        previous = metric
    return {"experiment": table.experiment, "anchor": f"table-{_anchor(table.experiment)}", "caption": caption(table),
            "columns": columns, "rows": rows,
            "text_columns": [c in ("metric", "test", *table.setting_keys) for c in columns]}


_ENVIRONMENT = jinja2.Environment(loader=jinja2.PackageLoader("dropstudy.report", "templates"),
                                  autoescape=True, trim_blocks=True, lstrip_blocks=True,
                                  undefined=jinja2.StrictUndefined)


def render(title: str, root: Path, tables: list[ExperimentTable], figures: list[Figure], arms: list[Figure],
           runs: Sequence[Run], skipped: Sequence[tuple[Path, str]], commands: list[tuple[str, str]]) -> str:
    return _ENVIRONMENT.get_template("report.html.j2").render(
        title=title, root=str(root), made=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        tables=[_table(t) for t in tables], figures=figures, arms=arms, provenance=provenance_rows(runs),
        commands=commands, skipped=[(str(p), s) for p, s in skipped])


def _commands(runs: Sequence[Run], root: Path, baseline: Sequence[str], report_what: str) -> list[tuple[str, str]]:
    made = [("made the runs", c) for c in run_commands(runs)]
    return made + [(report_what, report_command(root, baseline))]


def _arm_figures(tables: list[ExperimentTable]) -> list[Figure]:
    with tempfile.TemporaryDirectory() as folder:
        return [f for t in tables if (f := arms_figure(t, Path(folder))) is not None]


def write_report_page(report: Report, runs: Sequence[Run], baseline: Sequence[str] = ()) -> Path:
    """report.html beside report.md: the report's tables, the SVG copies of its figures, each
    setting's curves, provenance and commands."""
    figures = [figure_of(key.removesuffix(".svg"), path) for key, path in report.files.items()
               if path.suffix == ".svg" and path.is_file()]
    page = render(f"dropstudy report: {report.root.name}", report.root, report.tables, figures,
                  _arm_figures(report.tables), runs, report.skipped,
                  _commands(runs, report.root, baseline, "made this report"))
    path = report.out_dir / PAGE
    path.write_text(page)
    return path


def write_study_page(study_dir: Path, drawn: dict[str, Path]) -> Path:
    """study_dir/report.html: the table over the study's finished arms (one seed each), its
    comparison figures (`drawn`: each one's PNG, with its SVG beside it), each arm's curves,
    provenance and commands."""
    runs, skipped = find_runs(study_dir)
    tables = build_tables(runs) if runs else []
    for table in tables:
        add_comparisons(table, [])
    figures = [figure_of(name, path.with_suffix(".svg")) for name, path in drawn.items()]
    page = render(f"dropstudy study: {study_dir.name}", study_dir, tables, figures, _arm_figures(tables), runs,
                  skipped, _commands(runs, study_dir, (), "the study's report (its tables and paper figures, in report/)"))
    path = study_dir / PAGE
    path.write_text(page)
    return path
