"""`dropstudy report DIR`: the paper table and figures over every run under a directory.

A run is any folder with summary.json and .hydra/config.yaml (a sweep's jobs, a study's arms,
single runs), found recursively; runs that did not finish are skipped and named. Runs are
grouped per experiment, and within it per *setting*: the values of the config keys that vary
between the runs, other than the seed (and what only places a run, tracker.*). Each setting's
row holds mean ± std over its seeds of the final metrics in summary.json, the numbers a paper
table shows. The figures read metrics.jsonl (learning curves) and, for the regression fit, the
model in checkpoints/last.pt.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dropstudy import plots
from dropstudy.rundir import RunDir
from dropstudy.tracking import flatten

log = logging.getLogger("dropstudy")

# Final metrics of the table, in column order; a column appears when some run has it.
METRICS = ("train/loss", "val/loss", "test/loss", "train/acc", "val/acc", "test/acc", "gap/loss")
BEST_EPOCH = "val/loss_epoch"
# Keys that never make a setting: the seed (and what it seeds) is what the table averages over,
# tracker.* and sweep.* only say where a run is tracked or how it was launched.
NOT_SETTINGS = ("seed", "data.seed")
NOT_SETTING_PREFIXES = ("tracker.", "sweep.")
CURVE_METRICS = ("train/loss", "val/loss", "val/acc")


class ReportError(Exception):
    """Nothing to report on; the message says why."""


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flattened: {"model.dropout": 0.5, ...}
    summary: dict[str, Any]

    @property
    def experiment(self) -> str:
        return str(self.config.get("experiment", "?"))

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    def rows(self) -> list[dict]:
        return RunDir(self.path).read_metrics()


@dataclass
class Stat:
    mean: float
    std: float  # sample standard deviation over seeds; nan with one seed
    n: int

    def text(self, digits: int = 4) -> str:
        if math.isnan(self.mean):
            return "-"
        return f"{self.mean:.{digits}g} ± {self.std:.2g}" if not math.isnan(self.std) else f"{self.mean:.{digits}g}"


def stat(values: list[float]) -> Stat:
    values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return Stat(math.nan, math.nan, 0)
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values))


@dataclass
class SettingRow:
    setting: dict[str, Any]  # key -> value, for the setting keys of its experiment
    runs: list[Run]
    metrics: dict[str, Stat]
    best_epoch: Stat

    @property
    def label(self) -> str:
        return ", ".join(f"{k.split('.')[-1]}={_text(v)}" for k, v in self.setting.items()) or "all runs"


@dataclass
class ExperimentTable:
    experiment: str
    setting_keys: list[str]
    metric_keys: list[str]
    rows: list[SettingRow]


@dataclass
class Report:
    root: Path
    out_dir: Path
    tables: list[ExperimentTable]
    skipped: list[tuple[Path, str]]
    files: dict[str, Path] = field(default_factory=dict)
    tracker_sync: str | None = None


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def find_runs(root: Path) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Every run dir under root (summary.json + .hydra/config.yaml); not-finished ones apart."""
    runs, skipped = [], []
    for summary_path in sorted(root.rglob("summary.json")):
        run_dir = summary_path.parent
        config_path = run_dir / ".hydra" / "config.yaml"
        if not config_path.is_file() or (root / "report") in run_dir.parents:
            continue
        try:
            summary = json.loads(summary_path.read_text())
            config = flatten(yaml.safe_load(config_path.read_text()) or {})
        except (OSError, ValueError, yaml.YAMLError) as exc:
            skipped.append((run_dir, f"unreadable ({type(exc).__name__})"))
            continue
        if summary.get("status") != "finished":
            skipped.append((run_dir, str(summary.get("status"))))
            continue
        runs.append(Run(run_dir, config, summary))
    return runs, skipped


def setting_keys(runs: list[Run]) -> list[str]:
    """Config keys whose value differs between the runs: dropout first, its kind next."""
    keys = set().union(*(r.config.keys() for r in runs))
    values = {key: {_text(run.config.get(key)) for run in runs} for key in keys}
    varying = [k for k, v in values.items() if len(v) > 1 and k not in NOT_SETTINGS
               and not k.startswith(NOT_SETTING_PREFIXES)]
    first = [k for k in ("model.dropout", "model.dropout_kind") if k in varying]
    return first + sorted(k for k in varying if k not in first)


def _sort_key(setting: dict[str, Any]) -> tuple:
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, _text(v)) for v in setting.values())


def experiment_table(experiment: str, runs: list[Run]) -> ExperimentTable:
    keys = setting_keys(runs)
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(json.dumps([_text(run.config.get(k)) for k in keys]), []).append(run)
    present = [m for m in METRICS if any(m in r.summary.get("final", {}) for r in runs)]
    rows = []
    for members in groups.values():
        setting = {k: members[0].config.get(k) for k in keys}
        metrics = {m: stat([r.summary.get("final", {}).get(m) for r in members]) for m in present}
        best = stat([r.summary.get("best", {}).get(BEST_EPOCH) for r in members])
        rows.append(SettingRow(setting, sorted(members, key=lambda r: (str(r.seed), str(r.path))), metrics, best))
    rows.sort(key=lambda row: _sort_key(row.setting))
    return ExperimentTable(experiment, keys, present, rows)


def build_tables(runs: list[Run]) -> list[ExperimentTable]:
    by_experiment: dict[str, list[Run]] = {}
    for run in runs:
        by_experiment.setdefault(run.experiment, []).append(run)
    return [experiment_table(name, members) for name, members in sorted(by_experiment.items())]


# --------------------------------------------------------------------------- files


def header(table: ExperimentTable) -> list[str]:
    return [*table.setting_keys, "n seeds", *table.metric_keys, "best epoch (val/loss)"]


def cells(table: ExperimentTable, row: SettingRow) -> list[str]:
    return [*(_text(row.setting[k]) for k in table.setting_keys), str(len(row.runs)),
            *(row.metrics[m].text() for m in table.metric_keys), row.best_epoch.text(digits=5)]


def markdown(tables: list[ExperimentTable], root: Path, skipped: list[tuple[Path, str]]) -> str:
    out = io.StringIO()
    out.write(f"# Report: {root}\n\nMean ± sample standard deviation over seeds of the final metrics "
              "(summary.json of each run).\n")
    for table in tables:
        cols = header(table)
        out.write(f"\n## {table.experiment}\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        for row in table.rows:
            out.write("| " + " | ".join(cells(table, row)) + " |\n")
    if skipped:
        out.write("\nSkipped (not finished): " + ", ".join(f"{p} ({s})" for p, s in skipped) + "\n")
    return out.getvalue()


def write_csv(tables: list[ExperimentTable], path: Path) -> None:
    setting_cols = list(dict.fromkeys(k for t in tables for k in t.setting_keys))
    metric_cols = [m for m in (*METRICS, BEST_EPOCH) if any(m in t.metric_keys for t in tables) or m == BEST_EPOCH]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["experiment", *setting_cols, "n_seeds",
                         *(f"{m}_{s}" for m in metric_cols for s in ("mean", "std"))])
        for table in tables:
            for row in table.rows:
                stats = {**row.metrics, BEST_EPOCH: row.best_epoch}
                values = []
                for m in metric_cols:
                    s = stats.get(m, Stat(math.nan, math.nan, 0))
                    values += ["" if math.isnan(s.mean) else repr(s.mean), "" if math.isnan(s.std) else repr(s.std)]
                writer.writerow([table.experiment, *(_text(row.setting.get(k, "")) for k in setting_cols),
                                 len(row.runs), *values])


# --------------------------------------------------------------------------- figures


def _std0(s: Stat) -> float:
    return 0.0 if math.isnan(s.std) else s.std


def figure_vs_dropout(table: ExperimentTable, out: Path) -> Path:
    """Each loss (and accuracy) metric against the dropout rate, one line per other setting."""
    numeric = "model.dropout" in table.setting_keys and all(
        isinstance(r.setting["model.dropout"], (int, float)) for r in table.rows)
    others = [k for k in table.setting_keys if k != "model.dropout"] if numeric else []
    lines: dict[str, list[SettingRow]] = {}
    for row in table.rows:
        lines.setdefault(", ".join(f"{k.split('.')[-1]}={_text(row.setting[k])}" for k in others) or "mean ± std",
                         []).append(row)
    panels = {}
    for metric in (m for m in table.metric_keys if m != "gap/loss"):
        series = []
        for label, rows in lines.items():
            xs = [float(r.setting["model.dropout"]) for r in rows] if numeric else list(range(len(rows)))
            series.append(plots.SeedStats(label, xs, [r.metrics[metric].mean for r in rows],
                                          [_std0(r.metrics[metric]) for r in rows]))
        panels[metric] = series
    ticks = None if numeric else [r.label for r in table.rows]
    return plots.metric_vs_setting(panels, "dropout rate p" if numeric else "setting",
                                   out / f"{table.experiment}_vs_dropout.png",
                                   f"{table.experiment}: final metrics over seeds", xticks=ticks)


def figure_learning_curves(table: ExperimentTable, out: Path) -> Path:
    """Mean ± std band over seeds per setting, at the epochs every seed logged."""
    panels: dict[str, list[plots.SeedStats]] = {}
    for row in table.rows:
        per_run = [r.rows() for r in row.runs]
        for metric in CURVE_METRICS:
            series = [{x["epoch"]: x[metric] for x in rows if metric in x and isinstance(x[metric], (int, float))}
                      for rows in per_run]
            epochs = sorted(set.intersection(*(set(s) for s in series))) if series else []
            if not epochs:
                continue
            stats = [stat([s[e] for s in series]) for e in epochs]
            panels.setdefault(metric, []).append(
                plots.SeedStats(f"{row.label} (n={len(row.runs)})", epochs, [s.mean for s in stats],
                                [_std0(s) for s in stats]))
    return plots.mean_learning_curves(panels, out / f"{table.experiment}_learning_curves.png",
                                      f"{table.experiment}: learning curves, mean ± std over seeds")


def figure_regression_fit(table: ExperimentTable, out: Path) -> Path | None:
    """Each setting's fitted curve for one seed (the same seed for all where they share one),
    from the model its checkpoint holds."""
    import torch

    from dropstudy.checkpoint import RunDirError, load_checkpoint, load_run_config
    from dropstudy.data import load_dataset
    from dropstudy.models import build_model
    from dropstudy.runner import _points, regression_fit_curve
    from dropstudy.runtime import seed_everything

    shared = set.intersection(*({str(r.seed) for r in row.runs} for row in table.rows))
    seed = min(shared, key=lambda s: (len(s), s)) if shared else None  # the smallest, numerically
    fits, data = [], None
    for row in table.rows:
        run = next((r for r in row.runs if str(r.seed) == seed), row.runs[0])
        try:
            cfg = load_run_config(run.path)
            state = load_checkpoint(run.path, cfg)
        except RunDirError as exc:
            log.warning(f"report: no fit curve for {row.label}: {exc}")
            continue
        model = build_model(cfg.model)
        model.load_state_dict(state["model"])
        seed_everything(cfg.seed)
        run_data = load_dataset(cfg.data, torch.device("cpu"), lambda _: None)
        data = data or run_data
        fits.append(regression_fit_curve(model, run_data, f"{row.label} (seed {cfg.seed})"))
    if not fits:
        return None
    seeds = f"seed {seed}" if seed is not None else "one seed per setting"
    return plots.regression_fit(_points(data.train), _points(data.test), fits,
                                out / f"{table.experiment}_fit.png", f"{table.experiment}: fit, {seeds}")


# --------------------------------------------------------------------------- the report


def make_report(root: Path) -> Report:
    if not root.is_dir():
        raise ReportError(f"{root}: no such directory; give a directory of runs (a sweep, a study, runs/).")
    runs, skipped = find_runs(root)
    if not runs:
        what = f"; {len(skipped)} did not finish" if skipped else ""
        raise ReportError(f"{root}: no finished runs found (a run is a folder with summary.json and "
                          f".hydra/config.yaml){what}.")
    out = root / "report"
    out.mkdir(exist_ok=True)
    tables = build_tables(runs)
    report = Report(root, out, tables, skipped)
    (out / "report.md").write_text(markdown(tables, root, skipped))
    write_csv(tables, out / "report.csv")
    report.files.update({"report.md": out / "report.md", "report.csv": out / "report.csv"})
    for table in tables:
        report.files[f"{table.experiment}_vs_dropout"] = figure_vs_dropout(table, out)
        report.files[f"{table.experiment}_learning_curves"] = figure_learning_curves(table, out)
        if table.experiment == "regression":
            fit = figure_regression_fit(table, out)
            if fit is not None:
                report.files[f"{table.experiment}_fit"] = fit
    log_to_wandb(report, runs)
    return report


def log_to_wandb(report: Report, runs: list[Run]) -> None:
    """When the runs were tracked: one W&B run, job_type `report`, in the runs' group."""
    from omegaconf import OmegaConf

    from dropstudy.tracking import make_tracker

    tracked = [r for r in runs if (r.summary.get("wandb") or {}).get("run_id")
               and r.config.get("tracker.mode") != "disabled"]
    if not tracked:
        return
    group = Counter((r.summary["wandb"].get("group") or "") for r in tracked).most_common(1)[0][0] or None
    first = tracked[0].config
    tracker_cfg = OmegaConf.create({"mode": first.get("tracker.mode", "auto"), "project": first.get("tracker.project"),
                                    "entity": first.get("tracker.entity")})
    tracker = make_tracker(
        tracker_cfg, run_dir=report.out_dir, group=group, job_type="report",
        tags=sorted({r.experiment for r in runs}) + ["report"], name=f"{group or report.root.name}-report",
        config={"report.dir": str(report.root), "report.runs": len(runs), "report.skipped": len(report.skipped)},
    )
    try:
        tracker.log_images({f"report/{k}": v for k, v in report.files.items() if v.suffix == ".png"}, epoch=0, step=0)
        for table in report.tables:
            tracker.log_table(f"report/{table.experiment}", header(table), [cells(table, r) for r in table.rows], 0)
    finally:
        tracker.finish()
    report.tracker_sync = tracker.sync_command
