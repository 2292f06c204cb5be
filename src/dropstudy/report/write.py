"""`dropstudy report DIR` writes: the report planned (every run read and checked first), then its table files,
the figures over seeds, report.html and the W&B report run."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from dropstudy.data.datasets import load_dataset
from dropstudy.engine.runtime import seed_everything
from dropstudy.model.networks import build_model
from dropstudy.report import plots
from dropstudy.report.curves import regression_fit_curve, split_points
from dropstudy.report.html import write_report_page
from dropstudy.report.tables import (
    CURVE_METRICS,
    DROPOUT,
    METRICS,
    ExperimentTable,
    Report,
    ReportError,
    Run,
    SettingRow,
    add_comparisons,
    build_tables,
    cells,
    check_baseline,
    find_runs,
    header,
    latex,
    markdown,
    parse_baseline,
    read_rows,
    seed_values,
    skip_reason,
    table_rows,
    value_text,
    write_csv,
)
from dropstudy.store.rundir import RunDir, RunDirError
from dropstudy.tracking.wandb_run import make_tracker

log = logging.getLogger("dropstudy")


def _units(table: ExperimentTable) -> tuple[str, str]:
    """The loss and accuracy axis labels, with units."""
    loss = "cross-entropy (nats)" if table.loss == "cross-entropy" else "MSE (unitless targets)"
    return loss, "accuracy (%)"


def _figure_values(metric: str, values: list[float | None]) -> list[float]:
    """A metric's values as its figure draws them: accuracy in percent."""
    scale = 100.0 if metric.endswith("acc") else 1.0
    return [scale * v for v in values if v is not None]


def _epoch_label(table: ExperimentTable) -> str:
    run = table.rows[0].runs[0]
    if run.config.get("data.name") == "regression" and run.config.get("trainer.batch_size") is None:
        return "epoch (one full-batch SGD step)"
    return "epoch (one pass over the training set)"


def _seed_range(table: ExperimentTable) -> str:
    counts = sorted({len(r.runs) for r in table.rows})
    if len(counts) > 1:
        return f"{counts[0]}–{counts[-1]} seeds"
    return "1 seed" if counts[0] == 1 else f"{counts[0]} seeds"


# How a figure names each split: the training metrics with dropout on (training mode) and the
# training data evaluated in eval mode are both "train", so their labels say which.
SPLIT_NAMES = {"train": "train (dropout on)", "train_eval": "train (eval mode)", "val": "val", "test": "test"}


SPLIT_COLORS = {"train": "tab:blue", "train_eval": "tab:purple", "val": "tab:orange", "test": "tab:green"}


SPLIT_STYLES = {"train": "-", "train_eval": ":", "val": "--"}


STYLES = ("-", "--", ":", "-.")


def figure_vs_dropout(table: ExperimentTable, out: Path) -> Path:
    """Each final loss (and accuracy) against the dropout rate: a panel per unit, a colour per
    split, a line style per other setting (e.g. dropout kind), error bars of the 95% interval."""
    numeric = DROPOUT in table.setting_keys and all(
        isinstance(r.setting[DROPOUT], (int, float)) for r in table.rows)
    others = [k for k in table.setting_keys if k != DROPOUT] if numeric else []
    groups: dict[str, list[SettingRow]] = {}
    for row in table.rows:
        groups.setdefault(", ".join(f"{k.split('.')[-1]}={value_text(row.setting[k])}" for k in others), []).append(row)
    loss_label, acc_label = _units(table)
    panels: dict[str, list[plots.SeedStats]] = {}
    for metric in (m for m in table.metric_keys if m in METRICS and not m.startswith("gap/")):
        split = metric.split("/")[0]
        name = SPLIT_NAMES.get(split, split)
        ylabel = f"final {loss_label if metric.endswith('loss') else acc_label}"
        for style, (group, rows) in zip(STYLES * 4, groups.items()):
            xs = [float(r.setting[DROPOUT]) for r in rows] if numeric else list(range(len(rows)))
            panels.setdefault(ylabel, []).append(plots.SeedStats(
                f"{name}, {group}" if group else name, xs,
                [_figure_values(metric, [r.value(metric) for r in row.runs]) for row in rows], style,
                SPLIT_COLORS.get(split)))
    ticks = None if numeric else [r.label for r in table.rows]
    xlabel = "dropout rate p (probability of dropping a unit)" if numeric else "setting"
    return plots.metric_vs_setting(panels, xlabel, out / f"{table.experiment}_vs_dropout.png", _seed_range(table),
                                   xticks=ticks)


def figure_learning_curves(table: ExperimentTable, out: Path) -> Path:
    """Per setting, the centre over seeds of each curve with its 95% band, at the epochs every
    seed logged: training (dropout on, and in eval mode where logged) and validation loss in one
    panel, or a panel each where one axis would squash one of them; accuracies in another."""
    loss_label, acc_label = _units(table)
    lines: list[tuple[str, plots.SeedStats]] = []  # (metric, line), a setting's lines together
    for color, row in zip(plots.COLORS * 4, table.rows):
        per_run = [r.rows() for r in row.runs]
        for metric in CURVE_METRICS:
            epochs, samples = seed_values(per_run, metric)
            if not epochs:
                continue
            split = metric.split("/")[0]
            lines.append((metric, plots.SeedStats(
                f"{row.label}, {SPLIT_NAMES[split]}", epochs,
                [_figure_values(metric, values) for values in samples], SPLIT_STYLES[split], color)))

    def values(metrics: Sequence[str]) -> list[float]:
        return [v for m, line in lines if m in metrics for vs in line.samples for v in vs]

    train, val = ("train/loss", "train_eval/loss"), ("val/loss",)
    if plots.squashes(values(train), values(val)):
        loss_panels = {f"training {loss_label}": train, f"validation {loss_label}": val}
    else:
        loss_panels = {loss_label: train + val}
    panels = {label: [line for m, line in lines if m in metrics]
              for label, metrics in {**loss_panels, acc_label: ("train/acc", "train_eval/acc", "val/acc")}.items()}
    return plots.mean_learning_curves({k: v for k, v in panels.items() if v}, _epoch_label(table),
                                      out / f"{table.experiment}_learning_curves.png", _seed_range(table))


def figure_regression_fit(table: ExperimentTable, out: Path) -> Path | None:
    """Each setting's fitted curve for one seed (the same seed for all where they share one),
    from the model its checkpoint holds."""
    import torch

    shared = set.intersection(*({str(r.seed) for r in row.runs} for row in table.rows))
    seed = min(shared, key=lambda s: (len(s), s)) if shared else None  # the smallest, numerically
    fits, data = [], None
    for row in table.rows:
        run = next((r for r in row.runs if str(r.seed) == seed), row.runs[0])
        try:
            cfg = RunDir.existing(run.path).read_config()
            state = RunDir.existing(run.path).read_checkpoint(cfg)
        except RunDirError as exc:
            log.warning(f"report: no fit curve for {row.label}: {exc}")
            continue
        model = build_model(cfg.model)
        model.load_state_dict(state["model"])
        seed_everything(cfg.seed)
        run_data = load_dataset(cfg.data, torch.device("cpu"), lambda _: None)
        data = data or run_data
        fits.append(regression_fit_curve(model, run_data, f"{row.label}, seed {cfg.seed}"))
    if not fits:
        return None
    return plots.regression_fit(split_points(data.train), split_points(data.test), fits,
                                out / f"{table.experiment}_fit.png", f"{table.experiment}: fit", column=True)


def plan_report(root: Path, baseline: Sequence[str] = ()) -> Report:
    """Everything `write_report` writes, read and checked first: a refused report (ReportError)
    writes nothing, not even root/report/."""
    if not root.is_dir():
        raise ReportError(f"{root}: no such directory; give a directory of runs (a sweep, a study, runs/).")
    pairs = parse_baseline(baseline)
    runs, skipped = find_runs(root)
    if not runs:
        what = ("; skipped: " + "; ".join(f"{p} ({skip_reason(s)})" for p, s in skipped[:5])
                + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")) if skipped else ""
        raise ReportError(f"{root}: no finished runs found (a run is a folder with summary.json and "
                          f".hydra/config.yaml){what}.")
    notes = read_rows(runs)
    tables = build_tables(runs)
    if pairs:
        check_baseline(tables, pairs)
    for table in tables:
        add_comparisons(table, pairs)
    return Report(root, root / "report", tables, skipped, notes, runs, baseline=tuple(baseline))


def write_report(report: Report) -> Report:
    """The tables and figures `plan_report` made, in root/report/."""
    root, out, tables, skipped, runs = report.root, report.out_dir, report.tables, report.skipped, report.runs
    out.mkdir(exist_ok=True)
    writers: dict[str, Callable[[], str]] = {"report.md": lambda: markdown(tables, root, skipped),
                                              "report.tex": lambda: latex(tables, root)}
    for name, text in writers.items():
        (out / name).write_text(text())
        report.files[name] = out / name
    write_csv(tables, out / "report.csv")
    report.files["report.csv"] = out / "report.csv"
    for table in tables:
        figures = {"vs_dropout": figure_vs_dropout(table, out), "learning_curves": figure_learning_curves(table, out)}
        if table.experiment == "regression":
            figures["fit"] = figure_regression_fit(table, out)
        for name, png in figures.items():
            if png is not None:
                report.files[f"{table.experiment}_{name}"] = png
                for suffix in (".pdf", ".svg"):
                    report.files[f"{table.experiment}_{name}{suffix}"] = png.with_suffix(suffix)

    report.files["report.html"] = write_report_page(report, runs, report.baseline)
    log_to_wandb(report, runs)
    return report


def log_to_wandb(report: Report, runs: list[Run]) -> None:
    """When the runs were tracked: one W&B run, job_type `report`, in the runs' group."""
    from omegaconf import OmegaConf

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
            tracker.log_table(f"report/{table.experiment}", header(table),
                              [cells(table, metric, row) for metric, row in table_rows(table)], 0)
    finally:
        tracker.finish()
    report.tracker_sync = tracker.sync_command
