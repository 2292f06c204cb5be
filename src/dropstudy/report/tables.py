"""`dropstudy report DIR`: the paper table, its statistics and figures over every run under a directory.

A run is any folder with summary.json and .hydra/config.yaml (a sweep's jobs, a study's arms,
single runs), found recursively; one that did not finish, a rerun (not another seed) or one
whose records are missing or unreadable is skipped and named with why. Everything is read and
checked before root/report/ is written (`plan_report`, then `write_report`). Runs are
grouped per experiment, and within it per *setting*: the values of the config keys that vary
between the runs, other than the seed (and what only places a run, tracker.*). For each final
metric in summary.json a setting's row holds n, mean, std and the 95% interval over its seeds,
and how it differs from the baseline setting (no dropout unless `--baseline` says otherwise):
the difference of means with its interval, p-values, effect size and wins, paired by seed where
both ran the same seeds (the statistics are in `stats`). The same numbers go to report.md,
report.csv and report.tex (booktabs). The figures read metrics.jsonl (learning curves) and, for
the regression fit, the model in checkpoints/last.pt; each is written as PNG, PDF and SVG.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dropstudy.report.stats import PAIRED, WELCH, Comparison, Stat, describe, holm, paired, welch
from dropstudy.store.rundir import STATUSES, RunDir, RunDirError
from dropstudy.store.text import flatten


# Final metrics of the table, in row order; a metric appears when some run has it. train/* is the
# training-mode running value (dropout on), train_eval/* the training data in eval mode, and
# gap/* = val/* − train_eval/*.
METRICS = ("train/loss", "train_eval/loss", "val/loss", "test/loss", "train/acc", "train_eval/acc", "val/acc",
           "test/acc", "gap/loss", "gap/acc")
BEST_EPOCH = "val/loss_epoch"  # from summary.json's "best": the epoch of the lowest val/loss
BEST_VAL_LOSS = "val/loss_best"  # from summary.json's "best": the lowest val/loss itself
FROM_BEST = {BEST_EPOCH: "val/loss_epoch", BEST_VAL_LOSS: "val/loss"}
# Keys that never make a setting: the seed (and what it seeds) is what the table averages over,
# tracker.* and sweep.* only say where a run is tracked or how it was launched.
NOT_SETTINGS = ("seed", "data.seed")
NOT_SETTING_PREFIXES = ("tracker.", "sweep.")
CURVE_METRICS = ("train/loss", "train_eval/loss", "val/loss", "train/acc", "train_eval/acc", "val/acc")
DROPOUT = "model.dropout"
NA = "n/a"


class ReportError(Exception):
    """Nothing to report on, or a baseline that names no setting; the message says why."""


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flattened: {"model.dropout": 0.5, ...}
    summary: dict[str, Any]
    metrics: list[dict] | None = None  # metrics.jsonl's rows, once read

    @property
    def experiment(self) -> str:
        return str(self.config.get("experiment", "?"))

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    def value(self, metric: str) -> float | None:
        """The run's final value of `metric` (the best val/loss and its epoch from summary.json's "best")."""
        if metric in FROM_BEST:
            value = (self.summary.get("best") or {}).get(FROM_BEST[metric])
        else:
            value = (self.summary.get("final") or {}).get(metric)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else None

    def rows(self) -> list[dict]:
        if self.metrics is None:
            self.metrics = RunDir.existing(self.path).read_metrics()
        return self.metrics


@dataclass
class SettingRow:
    setting: dict[str, Any]  # key -> value, for the setting keys of its experiment
    runs: list[Run]
    metrics: dict[str, Stat]
    is_baseline: bool = False
    baseline: SettingRow | None = None
    comparisons: dict[str, Comparison] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return ", ".join(f"{k.split('.')[-1]}={value_text(v)}" for k, v in self.setting.items()) or "all runs"


@dataclass
class ExperimentTable:
    experiment: str
    setting_keys: list[str]
    metric_keys: list[str]  # the final metrics, then BEST_EPOCH
    rows: list[SettingRow]
    loss: str  # what the loss is: "MSE" or "cross-entropy"
    baseline: str | None = None  # the baseline setting, in words; None: no comparisons
    notes: list[str] = field(default_factory=list)
    eval_every: list[int] = field(default_factory=list)  # the runs' evaluation cadences: the best epoch's resolution

    @property
    def designs(self) -> list[str]:
        return sorted({c.design for row in self.rows for c in row.comparisons.values()})


@dataclass
class Report:
    root: Path
    out_dir: Path
    tables: list[ExperimentTable]
    skipped: list[tuple[Path, str]]  # each run left out, and why (its status, when it did not finish)
    notes: list[str] = field(default_factory=list)  # what was read around (a half-written last line)
    runs: list[Run] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    tracker_sync: str | None = None
    baseline: tuple[str, ...] = ()  # the --baseline items it was made with, for the commands it prints


def value_text(value: Any) -> str:
    """A config value as tables, labels and W&B group keys print it (lists as JSON)."""
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def find_runs(root: Path) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Every run dir under root (a folder with summary.json or .hydra/config.yaml, other than a
    study's own folder); each one that is not a finished run of its own is set apart with why:
    not finished (its status), a rerun (not another seed), a missing or unreadable record."""
    runs, skipped = [], []
    found = {p.parent for p in root.rglob("summary.json")} | {p.parent.parent for p in root.rglob(".hydra/config.yaml")}
    for run_dir in sorted(found):
        if (root / "report") in run_dir.parents or run_dir == root / "report" or _is_study_dir(run_dir):
            continue
        rerun = next((d for d in (run_dir, *run_dir.parents) if d != root and root in d.parents
                      and any((d / name).is_file() for name in RERUN_MARKERS)), None)
        if rerun is not None:
            skipped.append((run_dir, f"a rerun of another run ({_marker(rerun, RERUN_MARKERS).relative_to(root)}), "
                                     "not another seed"))
            continue
        rd = RunDir.existing(run_dir)
        if not rd.summary_path.is_file():
            skipped.append((run_dir, "no summary.json: it never started, or stopped before writing one"))
            continue
        try:
            summary = rd.read_summary()
        except (OSError, ValueError) as exc:
            skipped.append((run_dir, f"{rd.summary_path}: not readable JSON ({type(exc).__name__})"))
            continue
        if not isinstance(summary, dict):
            skipped.append((run_dir, f"{rd.summary_path}: not a run summary (a JSON object)"))
            continue
        config, problem = _run_config(rd)
        if problem is not None:
            skipped.append((run_dir, problem))
            continue
        if summary.get("status") != "finished":
            skipped.append((run_dir, str(summary.get("status"))))
            continue
        runs.append(Run(run_dir, config, summary))
    return runs, skipped


# Files a rerun leaves in its directory (or, for a study or sweep rerun, in the folder of its runs).
RERUN_MARKERS = ("rerun.json", "rerun.log")
# The keys every run's config has that the report reads: without them it is not a run's config.
RUN_CONFIG_KEYS = ("experiment", "seed", "model", "data")


def _marker(directory: Path, names: Sequence[str]) -> Path:
    return next(directory / n for n in names if (directory / n).is_file())


def _is_study_dir(path: Path) -> bool:
    """A study's own folder: its config and record, while its arms are runs of their own."""
    if (path / "study.json").is_file():
        return True
    try:
        return RunDir.existing(path).job_name() == "study"
    except Exception:  # an unreadable .hydra/hydra.yaml: the run's own checks say what is wrong
        return False


def _run_config(rd: RunDir) -> tuple[dict[str, Any], str | None]:
    """The run's saved config, flattened, or the reason it is not a run's config."""
    if not rd.config_path.is_file():
        return {}, f"{rd.config_path}: missing, so it is not a run directory"
    try:
        config = rd.read_config_dict()
    except Exception as exc:  # OSError, or any of YAML's and OmegaConf's errors on a damaged file
        return {}, f"{rd.config_path}: not a valid run config (unreadable: {type(exc).__name__})"
    if not isinstance(config, dict):
        return {}, f"{rd.config_path}: not a valid run config (not a mapping of keys)"
    missing = [k for k in RUN_CONFIG_KEYS if k not in config]
    wrong = [k for k in ("model", "data") if k in config and not isinstance(config[k], dict)]
    if missing or wrong:
        detail = f"no {', '.join(missing)}" if missing else f"{', '.join(wrong)} not a mapping"
        return {}, f"{rd.config_path}: not a valid run config ({detail})"
    return flatten(config), None


def not_finished(status: str) -> bool:
    """Whether a skipped run's reason is its status (it did not finish), not a problem with it."""
    return status in STATUSES or status == "None"


def skip_reason(reason: str) -> str:
    return f"{reason}, not finished" if not_finished(reason) else reason


def read_rows(runs: list[Run]) -> list[str]:
    """Every run's metrics rows, read once, before anything is written: a damaged metrics.jsonl
    refuses the report (ReportError); a half-written last line is left out, and said so."""
    notes = []
    for run in runs:
        rd = RunDir.existing(run.path)
        try:
            run.metrics = rd.read_metrics()
        except RunDirError as exc:
            raise ReportError(str(exc)) from None
        if rd.torn_tail():
            notes.append(f"{rd.torn_tail()}; left out, the learning curves use its complete rows")
    return notes


def setting_keys(runs: list[Run]) -> list[str]:
    """Config keys whose value differs between the runs: dropout first, its kind next."""
    keys = set().union(*(r.config.keys() for r in runs))
    values = {key: {value_text(run.config.get(key)) for run in runs} for key in keys}
    varying = [k for k, v in values.items() if len(v) > 1 and k not in NOT_SETTINGS
               and not k.startswith(NOT_SETTING_PREFIXES)]
    first = [k for k in ("model.dropout", "model.dropout_kind") if k in varying]
    return first + sorted(k for k in varying if k not in first)


def _sort_key(setting: dict[str, Any]) -> tuple:
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, value_text(v)) for v in setting.values())


def experiment_table(experiment: str, runs: list[Run]) -> ExperimentTable:
    keys = setting_keys(runs)
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(json.dumps([value_text(run.config.get(k)) for k in keys]), []).append(run)
    present = [m for m in (*METRICS, BEST_VAL_LOSS, BEST_EPOCH) if any(r.value(m) is not None for r in runs)]
    rows = []
    for members in groups.values():
        setting = {k: members[0].config.get(k) for k in keys}
        metrics = {m: describe([r.value(m) for r in members]) for m in present}
        rows.append(SettingRow(setting, sorted(members, key=lambda r: (str(r.seed), str(r.path))), metrics))
    rows.sort(key=lambda row: _sort_key(row.setting))
    loss = "cross-entropy" if runs[0].config.get("data.name") == "cifar10" else "MSE"
    # summary.json's eval_every, or the config's for runs written before the summary kept it.
    cadences = {r.summary.get("eval_every", r.config.get("trainer.eval_every")) for r in runs}
    table = ExperimentTable(experiment, keys, present, rows, loss,
                            eval_every=sorted(c for c in cadences if isinstance(c, int)))
    if any(s.n == 1 for row in rows for s in row.metrics.values()):
        table.notes.append("a setting with one seed has no std or interval (n/a)")
    return table


def build_tables(runs: list[Run]) -> list[ExperimentTable]:
    by_experiment: dict[str, list[Run]] = {}
    for run in runs:
        by_experiment.setdefault(run.experiment, []).append(run)
    return [experiment_table(name, members) for name, members in sorted(by_experiment.items())]


# --------------------------------------------------------------------------- the baseline and comparisons


def parse_baseline(items: Sequence[str]) -> list[tuple[str, Any]]:
    """`--baseline KEY=VALUE` options as (key, value); the value is read as YAML, as Hydra reads
    an override, so `0`, `0.0`, `[0,0]` and `standard` mean what they say."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ReportError(f"--baseline {item!r}: expected KEY=VALUE, e.g. --baseline model.dropout=0.")
        try:
            pairs.append((key.strip(), yaml.safe_load(value)))
        except yaml.YAMLError:
            pairs.append((key.strip(), value))
    return pairs


def _resolve_key(key: str, keys: Sequence[str]) -> str | None:
    """The setting key `key` names: itself, or the one key ending in `.key` (`dropout`)."""
    if key in keys:
        return key
    ends = [k for k in keys if k.endswith("." + key)]
    return ends[0] if len(ends) == 1 else None


def _same(a: Any, b: Any) -> bool:
    return a == b or value_text(a) == value_text(b)


def _no_dropout(value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    return all(isinstance(v, (int, float)) and v == 0 for v in values)


def check_baseline(tables: list[ExperimentTable], pairs: list[tuple[str, Any]]) -> None:
    """A baseline the user named must be a setting of some experiment; else exit 2 saying which
    keys vary and which values they take."""
    for key, _ in pairs:
        if not any(_resolve_key(key, t.setting_keys) for t in tables):
            varying = sorted({k for t in tables for k in t.setting_keys})
            raise ReportError(f"--baseline {key}: not a key that varies between the runs; the settings differ in: "
                              f"{', '.join(varying) or 'nothing (one setting only)'}.")
    if not any(_baseline_rows(t, pairs) for t in tables):
        values = {}
        for key, _ in pairs:
            for t in tables:
                full = _resolve_key(key, t.setting_keys)
                if full:
                    values.setdefault(full, []).extend(value_text(r.setting[full]) for r in t.rows)
        allowed = "; ".join(f"{k} takes {', '.join(dict.fromkeys(v))}" for k, v in values.items())
        wanted = " ".join(f"{k}={value_text(v)}" for k, v in pairs)
        raise ReportError(f"--baseline {wanted} matches no setting: {allowed}.")


def _baseline_rows(table: ExperimentTable, pairs: list[tuple[str, Any]]) -> list[SettingRow]:
    if not pairs:
        if DROPOUT not in table.setting_keys:
            return []
        return [r for r in table.rows if _no_dropout(r.setting[DROPOUT])]
    keys = [_resolve_key(k, table.setting_keys) for k, _ in pairs]
    if None in keys:
        return []
    return [r for r in table.rows if all(_same(r.setting[k], v) for k, (_, v) in zip(keys, pairs))]


def better_is_higher(metric: str) -> bool | None:
    """Which way a metric wins: accuracy up, losses (and the train-val gap) down; the best epoch
    has no better side."""
    if metric == BEST_EPOCH:
        return None
    return True if metric.endswith("acc") else False if "loss" in metric else None


def compare(row: SettingRow, base: SettingRow, metric: str) -> Comparison | None:
    """`row` against `base` on one metric: by seed when both ran the same seeds once each."""
    seeds, base_seeds = [value_text(r.seed) for r in row.runs], [value_text(r.seed) for r in base.runs]
    if len(set(seeds)) == len(seeds) and len(set(base_seeds)) == len(base_seeds) and set(seeds) == set(base_seeds):
        by_seed = {value_text(r.seed): r.value(metric) for r in base.runs}
        pairs = [(r.value(metric), by_seed[value_text(r.seed)]) for r in row.runs]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if pairs:
            return paired([a for a, _ in pairs], [b for _, b in pairs], better_is_higher(metric))
    xs = [v for r in row.runs if (v := r.value(metric)) is not None]
    ys = [v for r in base.runs if (v := r.value(metric)) is not None]
    return welch(xs, ys) if xs and ys else None


def add_comparisons(table: ExperimentTable, pairs: list[tuple[str, Any]]) -> None:
    """Mark the baseline rows and compare every other row, on every metric, with the baseline
    that shares the most of its other setting values (with dropout kinds, the same kind)."""
    bases = _baseline_rows(table, pairs)
    if not bases:
        wanted = " ".join(f"{k}={value_text(v)}" for k, v in pairs) if pairs else "no dropout (model.dropout=0)"
        if len(table.rows) > 1:
            table.notes.append(f"no comparisons: no setting has {wanted}; pick the baseline with --baseline KEY=VALUE")
        return
    keys = [_resolve_key(k, table.setting_keys) for k, _ in pairs] if pairs else [DROPOUT]
    others = [k for k in table.setting_keys if k not in keys]
    for base in bases:
        base.is_baseline = True
    for row in table.rows:
        if row.is_baseline:
            continue
        row.baseline = max(bases, key=lambda b: sum(_same(b.setting[k], row.setting[k]) for k in others))
        for metric in table.metric_keys:
            comparison = compare(row, row.baseline, metric)
            if comparison is not None:
                row.comparisons[metric] = comparison
                table.notes.extend(n for n in comparison.notes if n not in table.notes)
    for metric in table.metric_keys:  # each metric's comparisons with the baseline are one family
        family = [row.comparisons[metric] for row in table.rows if metric in row.comparisons]
        for attr in ("p_t", "p_wilcoxon"):
            for c, adjusted in zip(family, holm([getattr(c, attr) for c in family])):
                setattr(c, f"{attr}_holm", adjusted)
    shared = ", ".join(f"{k.split('.')[-1]}={value_text(bases[0].setting[k])}" for k in keys)
    table.baseline = bases[0].label if len(bases) == 1 else f"{shared}, with the same other settings"


# --------------------------------------------------------------------------- table cells
# A cell is a list of pieces: text, or a number with its format, so that the plain table
# (console, report.md) and the LaTeX one print the same rounded numbers.

Cell = list  # of str | tuple[float, str]
MEAN, P, EFFECT = ".3g", ".2g", ".2f"


def _num(value: float, spec: str = MEAN) -> tuple[float, str]:
    return (value, spec)


def _format(value: float, spec: str) -> str:
    # Three significant digits, but whole numbers of 1000 and more in full (epoch 1460, not 1.46e+03).
    if spec == MEAN and 1e3 <= abs(value) < 1e6:
        return f"{value:.0f}"
    return format(value, spec)


def _interval(low: float, high: float) -> Cell:
    if math.isnan(low) or math.isnan(high):
        return [NA]
    return ["[", _num(low), ", ", _num(high), "]"]


def _mean_std(s: Stat) -> Cell:
    if s.n == 0:
        return [NA]
    return [_num(s.mean)] if math.isnan(s.std) else [_num(s.mean), " ± ", _num(s.std)]


def _columns(table: ExperimentTable) -> list[str]:
    cols = ["metric", *table.setting_keys, "n", "mean ± std", "95% CI"]
    if table.baseline is None:
        return cols
    cols += ["Δ vs baseline", "95% CI of Δ"]
    designs = table.designs
    if designs == [PAIRED]:
        return cols + ["p (paired t)", "p Holm (paired t)", "p (Wilcoxon)", "p Holm (Wilcoxon)", "d_z", "wins"]
    if designs == [WELCH]:
        return cols + ["p (Welch t)", "p Holm (Welch t)", "Hedges' g"]
    return cols + ["test", "p (t)", "p Holm (t)", "p (Wilcoxon)", "p Holm (Wilcoxon)", "effect", "wins"]


def _metric_name(metric: str) -> str:
    return {BEST_EPOCH: "best epoch (val/loss)", BEST_VAL_LOSS: "best val/loss"}.get(metric, metric)


def _cells(table: ExperimentTable, metric: str, row: SettingRow) -> list[Cell]:
    s = row.metrics[metric]
    out = [[_metric_name(metric)], *([value_text(row.setting[k])] for k in table.setting_keys), [str(s.n)],
           _mean_std(s), _interval(s.low, s.high)]
    if table.baseline is None:
        return out
    designs = table.designs
    extra = len(_columns(table)) - len(out)
    c = row.comparisons.get(metric)
    if row.is_baseline or c is None:
        return out + [["baseline" if row.is_baseline else NA]] + [[""] if row.is_baseline else [NA]] * (extra - 1)
    wins = [f"{c.wins}/{c.n}"] if c.wins is not None else [NA]
    stats = [[_num(c.diff)], _interval(c.low, c.high)]
    p_t = [[_num(c.p_t, P)], [_num(c.p_t_holm, P)]]
    p_wilcoxon = [[_num(c.p_wilcoxon, P)], [_num(c.p_wilcoxon_holm, P)]] if c.design == PAIRED else [[NA], [NA]]
    if designs == [PAIRED]:
        return out + stats + p_t + p_wilcoxon + [[_num(c.effect, EFFECT)], wins]
    if designs == [WELCH]:
        return out + stats + p_t + [[_num(c.effect, EFFECT)]]
    return out + stats + [[c.design], *p_t, *p_wilcoxon, [_num(c.effect, EFFECT), f" ({c.effect_name})"], wins]


def table_rows(table: ExperimentTable) -> list[tuple[str, SettingRow]]:
    """The table's rows in print order: metric by metric, every setting under each."""
    return [(metric, row) for metric in table.metric_keys for row in table.rows]


def _plain(cell: Cell) -> str:
    out = []
    for piece in cell:
        if isinstance(piece, tuple):
            value, spec = piece
            out.append(NA if math.isnan(value) else _format(value, spec))
        else:
            out.append(piece)
    return "".join(out)


def caption(table: ExperimentTable) -> str:
    """What the table shows, which test made its p-values, and what each n/a means."""
    loss = f"{table.loss} (nats)" if table.loss == "cross-entropy" else table.loss
    text = (f"{table.experiment}: final metrics over seeds (each run's summary.json; the loss is {loss}). "
            "n: seeds; mean ± sample std; 95% CI: t interval of the mean.")
    if "train_eval/loss" in table.metric_keys:  # runs from before train_eval took the gap from train/loss
        text += " train_eval: the training data in eval mode (dropout off); gap = val − train_eval."
    if BEST_EPOCH in table.metric_keys and table.eval_every:
        every = " or ".join(map(str, table.eval_every))
        text += (" best val/loss and best epoch: the lowest val/loss among the evaluations (and its epoch), "
                 + ("every epoch." if table.eval_every == [1] else f"every {every} epochs."))
    designs = table.designs
    if table.baseline is not None:
        text += f" Δ: setting − baseline ({table.baseline}), with its 95% interval; "
        paired_text = ("paired by seed: paired t-test and Wilcoxon signed-rank test (two-sided), effect size "
                       "Cohen's d_z (mean over std of the per-seed differences)")
        welch_text = ("unpaired (different seeds): Welch's t-test (two-sided), effect size Hedges' g "
                      "(pooled std, small-sample corrected)")
        if designs == [PAIRED]:
            text += paired_text + "."
        elif designs == [WELCH]:
            text += welch_text + "."
        else:
            text += f"test 'paired': {paired_text}; test 'Welch': {welch_text}."
        text += (" p Holm: the p-value Holm-adjusted for the settings compared with the baseline (per metric "
                 "and test), beside the uncorrected p.")
        if PAIRED in designs:
            text += (" wins: seeds on which the setting beats the baseline's run of the same seed "
                     "(lower loss, higher accuracy).")
    notes = list(table.notes)
    if WELCH in designs and PAIRED in designs:
        notes.append("unpaired rows have no Wilcoxon test or wins")
    if notes:
        text += " n/a: " + "; ".join(notes) + "."
    return text


def header(table: ExperimentTable) -> list[str]:
    return _columns(table)


def cells(table: ExperimentTable, metric: str, row: SettingRow) -> list[str]:
    return [_plain(c) for c in _cells(table, metric, row)]


# --------------------------------------------------------------------------- files


def markdown(tables: list[ExperimentTable], root: Path, skipped: list[tuple[Path, str]]) -> str:
    out = io.StringIO()
    out.write(f"# Report: {root}\n")
    for table in tables:
        cols = header(table)
        out.write(f"\n## {table.experiment}\n\n{caption(table)}\n\n| " + " | ".join(cols) + " |\n|"
                  + "---|" * len(cols) + "\n")
        for metric, row in table_rows(table):
            out.write("| " + " | ".join(c.replace("|", "\\|") for c in cells(table, metric, row)) + " |\n")
    unfinished = [(p, s) for p, s in skipped if not_finished(s)]
    if unfinished:
        out.write("\nSkipped (not finished): " + ", ".join(f"{p} ({s})" for p, s in unfinished) + "\n")
    others = [(p, s) for p, s in skipped if not not_finished(s)]
    if others:
        out.write("\nSkipped: " + "; ".join(f"{p} ({s})" for p, s in others) + "\n")
    return out.getvalue()


_TEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_TEX_WORDS = {"±": r"$\pm$", "Δ": r"$\Delta$", "−": "$-$", "d_z": "$d_z$"}


def tex_escape(text: str) -> str:
    """`text` as LaTeX prints it literally: specials escaped, ±, Δ and − in math."""
    pattern = "|".join(re.escape(w) for w in (*_TEX_WORDS, *_TEX_SPECIALS))
    return re.sub(pattern, lambda m: _TEX_WORDS.get(m.group(0)) or _TEX_SPECIALS[m.group(0)], text)


def _tex_number(value: float, spec: str) -> str:
    if math.isnan(value):
        return NA
    text = _format(value, spec)
    mantissa, _, exponent = text.partition("e")
    return f"${mantissa}\\times10^{{{int(exponent)}}}$" if exponent else f"${text}$"


def _tex(cell: Cell) -> str:
    return "".join(_tex_number(*p) if isinstance(p, tuple) else tex_escape(p) for p in cell)


def latex(tables: list[ExperimentTable], root: Path) -> str:
    """One booktabs `table*` per experiment, to `\\input` in a paper that loads booktabs and
    graphicx. A table wider than the text (it has up to a dozen columns) is scaled down to fit;
    a narrower one keeps its size."""
    out = io.StringIO()
    out.write(f"% dropstudy report {tex_escape(str(root))}: needs \\usepackage{{booktabs,graphicx}}.\n"
              "\\ifdefined\\dropstudybox\\else\\newsavebox{\\dropstudybox}\\fi\n")
    for table in tables:
        cols = _columns(table)
        align = "".join("l" if c == "metric" or c in table.setting_keys or c == "test" else "r" for c in cols)
        out.write("\\begin{table*}[t]\n\\centering\n\\small\n\\setlength{\\tabcolsep}{3pt}\n")
        out.write(f"\\caption{{{tex_escape(caption(table))}}}\n")
        out.write(f"\\label{{tab:dropstudy-{re.sub(r'[^A-Za-z0-9-]', '-', table.experiment)}}}\n")
        out.write(f"\\sbox{{\\dropstudybox}}{{%\n\\begin{{tabular}}{{{align}}}\n\\toprule\n")
        out.write(" & ".join(tex_escape(c) for c in cols) + " \\\\\n\\midrule\n")
        previous = None
        for metric, row in table_rows(table):
            if previous is not None and metric != previous:
                out.write("\\addlinespace\n")
            previous = metric
            out.write(" & ".join(_tex(c) for c in _cells(table, metric, row)) + " \\\\\n")
        out.write("\\bottomrule\n\\end{tabular}}%\n"
                  "\\ifdim\\wd\\dropstudybox>\\linewidth\\resizebox{\\linewidth}{!}{\\usebox{\\dropstudybox}}"
                  "\\else\\usebox{\\dropstudybox}\\fi\n\\end{table*}\n")
    return out.getvalue()


CSV_STATS = ("n", "mean", "std", "ci_low", "ci_high")
CSV_COMPARISON = ("baseline", "test", "n_pairs", "diff", "diff_ci_low", "diff_ci_high", "p_t", "p_t_holm",
                  "p_wilcoxon", "p_wilcoxon_holm", "effect_size", "effect", "wins")


def write_csv(tables: list[ExperimentTable], path: Path) -> None:
    """The same rows as the tables, unrounded: one line per experiment, metric and setting."""
    setting_cols = list(dict.fromkeys(k for t in tables for k in t.setting_keys))

    def number(value: float | None) -> str:
        return "" if value is None or math.isnan(value) else repr(value)

    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["experiment", *setting_cols, "metric", *CSV_STATS, *CSV_COMPARISON])
        for table in tables:
            for metric, row in table_rows(table):
                s = row.metrics[metric]
                line = [table.experiment, *(value_text(row.setting[k]) if k in row.setting else "" for k in setting_cols),
                        metric, s.n, *(number(v) for v in (s.mean, s.std, s.low, s.high))]
                c = row.comparisons.get(metric)
                if row.is_baseline:
                    line += ["self"] + [""] * (len(CSV_COMPARISON) - 1)
                elif c is None:
                    line += [row.baseline.label if row.baseline else ""] + [""] * (len(CSV_COMPARISON) - 1)
                else:
                    line += [row.baseline.label, c.test, c.n if c.design == PAIRED else "",
                             *(number(v) for v in (c.diff, c.low, c.high, c.p_t, c.p_t_holm, c.p_wilcoxon,
                                                    c.p_wilcoxon_holm)),
                             c.effect_name, number(c.effect), number(c.wins)]
                writer.writerow(line)


# --------------------------------------------------------------------------- figures














def seed_values(per_run: Sequence[Sequence[dict]], metric: str) -> tuple[list[int], list[list[float]]]:
    """`metric` at the epochs every run logged it: those epochs, and at each its values over the runs."""
    series = [{row["epoch"]: row[metric] for row in rows if isinstance(row.get(metric), (int, float))}
              for rows in per_run]
    epochs = sorted(set.intersection(*(set(s) for s in series))) if series else []
    return epochs, [[s[e] for s in series] for e in epochs]






# --------------------------------------------------------------------------- the report








