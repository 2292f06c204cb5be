"""A saved W&B view (a workspace) for a study, sweep or report directory, and a W&B Report for a
`dropstudy report`: the runs of one group, grouped by dropout rate, coloured as dropstudy's own
figures colour them, with sections for loss, gap, accuracy, dropout rates and weight norms,
histograms and figures.

`view_spec` reads the directory (its runs' summary.json and config) into a plain specification,
written as `wandb_view.json` beside the runs; `build_workspace` and `build_report` turn that
specification into `wandb_workspaces` objects, and `publish` saves them on the W&B server. Offline,
only the specification is written, and `dropstudy dashboard DIR` publishes it once the runs are
synced. No W&B failure here ever changes a command's exit code: `after_command` says it in one line.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

from dropstudy.report.plots import COLORS
from dropstudy.report.tables import Run, value_text
from dropstudy.store.rundir import RunDir, write_json_atomic
from dropstudy.store.text import flatten, shell_command
from dropstudy.tracking.tracker import first_line


VIEW_FILE = "wandb_view.json"
REPORT_CSV = Path("report") / "report.csv"
DROPOUT = "model.dropout"
# The config keys that a sweep or study may vary besides the rate, shown as further grouping levels.
GROUPING_CANDIDATES = (DROPOUT, "model.dropout_kind", "model.conv_dropout", "model.dropout_sites")
CLASSIFICATION_EXPERIMENTS = ("cifar10",)


class DashboardError(Exception):
    """A directory holds nothing a view can be made of; the message says why."""


class NothingTracked(DashboardError):
    """No run of the directory reached W&B (tracker.mode=disabled): there is no view to make."""


def rate_colors(rates: list[Any]) -> dict[str, str]:
    """One hex colour per dropout rate, in the order given: the colour dropstudy's figures draw
    the same arm in (plots.COLORS, taken in arm order)."""
    from matplotlib.colors import to_hex

    return {value_text(rate): to_hex(COLORS[i % len(COLORS)]) for i, rate in enumerate(rates)}


# --------------------------------------------------------------------------- the specification


def _kind_of(directory: Path) -> str:
    if (directory / "study.json").is_file():
        return "study"
    if (directory / "sweep.json").is_file():
        return "sweep"
    if (directory / REPORT_CSV).is_file():
        return "report"
    raise DashboardError(f"{directory}: not a study (study.json), sweep (sweep.json) or reported directory "
                         "(report/report.csv); give the directory `dropstudy study`, `sweep` or `report` made.")


def _runs(directory: Path) -> list[Any]:
    """Every run under directory that reached W&B (a run id in its summary.json), any status."""

    runs = []
    for summary_path in sorted(directory.rglob("summary.json")):
        run_dir = summary_path.parent
        if (directory / "report") in run_dir.parents or not (run_dir / ".hydra" / "config.yaml").is_file():
            continue
        try:
            summary = json.loads(summary_path.read_text())
            config = flatten(RunDir.existing(run_dir).read_config_dict())
        except (OSError, ValueError):
            continue
        if (summary.get("wandb") or {}).get("run_id"):
            runs.append(Run(run_dir, config, summary))
    return runs


def _sections(classification: bool, figure_keys: list[str]) -> list[dict[str, Any]]:
    line = lambda title, *ys: {"type": "line", "title": title, "x": "epoch", "y": list(ys)}  # noqa: E731
    regex = lambda title, pattern: {"type": "line", "title": title, "x": "epoch", "regex": pattern}  # noqa: E731
    sections = [
        {"name": "Loss", "panels": [line("loss: train (training mode), train (eval mode), val",
                                         "train/loss", "train_eval/loss", "val/loss")]},
        {"name": "Generalisation gap", "panels": [line("gap/loss", "gap/loss"), line("gap/acc", "gap/acc")]},
    ]
    if classification:
        sections.append({"name": "Accuracy", "panels": [line("accuracy: train (training mode), train (eval mode), "
                                                             "val", "train/acc", "train_eval/acc", "val/acc")]})
    sections += [
        {"name": "Dropout rates and weight norms", "panels": [regex("dropout rate per site", "^dropout/p/.*"),
                                                              regex("weight L2 norm per layer", "^weights/l2/.*")]},
        {"name": "Gradient and parameter histograms", "panels": [regex("gradients", "^gradients/.*"),
                                                                 regex("parameters", "^parameters/.*")]},
        {"name": "Figures", "panels": [{"type": "media", "title": "figures", "keys": figure_keys}]},
    ]
    return sections


def view_spec(directory: Path) -> dict[str, Any]:
    """What the view (and, for a reported directory, the report) shows, from the directory alone."""

    directory = Path(directory)
    kind = _kind_of(directory)
    runs = _runs(directory)
    if not runs:
        raise NothingTracked(f"{directory}: none of its runs was tracked by W&B (no wandb run id in any "
                             "summary.json); there is nothing to show.")
    group = Counter(r.summary["wandb"].get("group") or "" for r in runs).most_common(1)[0][0] or None
    runs = [r for r in runs if (r.summary["wandb"].get("group") or None) == group]
    first = runs[0].config
    record = json.loads((directory / f"{kind}.json").read_text()) if kind in ("study", "sweep") else {}
    if kind == "study":  # the arms' order, as the study's figures draw them
        arm_dirs = [a["run_dir"] for a in record.get("arms", [])]
        order = [r.config.get(DROPOUT) for r in
                 sorted(runs, key=lambda r: arm_dirs.index(str(r.path)) if str(r.path) in arm_dirs else len(arm_dirs))]
    else:
        order = sorted((r.config.get(DROPOUT) for r in runs), key=lambda v: (isinstance(v, list), value_text(v)))
    rates = list({value_text(v): v for v in order}.values())
    colors = rate_colors(rates)
    grouping = [key for key in GROUPING_CANDIDATES
                if key == DROPOUT or len({value_text(r.config.get(key)) for r in runs}) > 1]
    figure_keys = sorted({f"plots/{png.stem}" for r in runs for png in (r.path / "plots").glob("*.png")})
    if kind == "study":
        figure_keys = [f"study/{name}" for name in record.get("figures", {})] + figure_keys
    experiments = sorted({str(r.config.get("experiment")) for r in runs})
    spec: dict[str, Any] = {
        "kind": kind,
        "directory": str(directory),
        "entity": first.get("tracker.entity"),
        "project": first.get("tracker.project"),
        "group": group,
        "name": f"dropstudy {kind}: {group or directory.name}"[:128],
        "grouping": grouping,
        "run_colors": {r.summary["wandb"]["run_id"]: colors[value_text(r.config.get(DROPOUT))] for r in runs},
        "rate_colors": colors,
        "sections": _sections(any(e in CLASSIFICATION_EXPERIMENTS for e in experiments), figure_keys),
        # Runs that reached the server online have a URL; offline ones wait for `wandb sync`.
        "online": any((r.summary["wandb"].get("url") or "") for r in runs),
        "publish": shell_command("dropstudy", "dashboard", Path(directory)),
    }
    if (directory / REPORT_CSV).is_file():
        spec["report"] = report_spec(directory, runs, group)
    return spec


def report_spec(directory: Path, runs: list[Any], group: str | None) -> dict[str, Any]:
    """The W&B Report's text: report.csv as a table, the figures the report run logged, the
    commands behind the runs, and their provenance."""
    out = directory / "report"
    with (out / "report.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    figures = sorted(f"report/{p.stem}" for p in out.glob("*.png"))
    commands, provenance = [], []
    for run in runs:
        try:
            prov = json.loads((run.path / "provenance.json").read_text())
        except (OSError, ValueError):
            continue
        if prov.get("command") and prov["command"] not in commands:
            commands.append(prov["command"])
        git = prov.get("git") or {}
        line = (f"{run.path.name}: git {git.get('commit') or 'n/a'}{' (dirty)' if git.get('dirty') else ''}, "
                f"data sha256 {str(prov.get('data_sha256') or 'n/a')[:12]}")
        provenance.append(line)
    commands.append(shell_command("dropstudy", "report", Path(directory)))
    return {"title": f"dropstudy report: {group or directory.name}"[:128], "table": rows, "figures": figures,
            "commands": commands, "provenance": provenance}


def write_spec(directory: Path, spec: dict[str, Any]) -> Path:
    path = Path(directory) / VIEW_FILE
    write_json_atomic(path, spec)
    return path


# --------------------------------------------------------------------------- wandb_workspaces objects


def _panels(panels: list[dict[str, Any]]) -> list[Any]:
    import wandb_workspaces.reports.v2 as wr

    built = []
    for panel in panels:
        if panel["type"] == "media":
            built.append(wr.MediaBrowser(title=panel["title"], media_keys=list(panel["keys"]), num_columns=2))
        elif "regex" in panel:
            built.append(wr.LinePlot(title=panel["title"], x=panel["x"], metric_regex=panel["regex"]))
        else:
            built.append(wr.LinePlot(title=panel["title"], x=panel["x"], y=list(panel["y"])))
    return built


def config_key(key: str) -> str:
    """W&B's name for a config key: dropstudy logs its config flat ("model.dropout" is one key),
    whose value W&B keeps under ".value" at the end (the library assumes nesting unless told)."""
    return f"{key}.value"


def group_filter(group: str | None) -> str:
    return f"Group == {json.dumps(group)}" if group else ""


def build_workspace(spec: dict[str, Any], entity: str | None = None) -> Any:
    """The saved view: filtered to the spec's group, grouped by its keys, one colour per rate."""
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces import expr

    return ws.Workspace(
        entity=entity or spec["entity"],
        project=spec["project"],
        name=spec["name"],
        sections=[ws.Section(name=s["name"], panels=_panels(s["panels"]), is_open=True) for s in spec["sections"]],
        settings=ws.WorkspaceSettings(x_axis="epoch"),
        runset_settings=ws.RunsetSettings(
            filters=group_filter(spec["group"]),
            groupby=[expr.Config(config_key(key)) for key in spec["grouping"]],
            run_settings={run_id: ws.RunSettings(color=color) for run_id, color in spec["run_colors"].items()},
            # The rate's groups too (the first grouping level), by the rate as W&B shows the value.
            group_colors=dict(spec["rate_colors"]),
        ),
    )


def build_report(spec: dict[str, Any], entity: str | None = None) -> Any:
    """The W&B Report of a `dropstudy report`: its table, figures, commands and provenance, and
    the runs' panels grouped by rate."""
    import wandb_workspaces.reports.v2 as wr

    text = spec["report"]
    entity = entity or spec["entity"]
    table = text["table"]
    markdown = ""
    if table:
        markdown = "| " + " | ".join(table[0]) + " |\n|" + "---|" * len(table[0]) + "\n"
        markdown += "".join("| " + " | ".join(row) + " |\n" for row in table[1:])
    runset = wr.Runset(entity=entity, project=spec["project"], name=spec["group"] or "runs",
                       filters=group_filter(spec["group"]), groupby=[f"config.{config_key(key)}" for key in spec["grouping"]])
    panels = [p for s in spec["sections"] for p in s["panels"] if p["type"] != "media"]
    return wr.Report(
        entity=entity,
        project=spec["project"],
        title=text["title"],
        description=f"Runs of W&B group {spec['group']}, grouped by {', '.join(spec['grouping'])}.",
        blocks=[
            wr.H1("Final metrics: means, 95% intervals and paired tests (report.csv)"),
            wr.MarkdownBlock(markdown or "(no rows)"),
            wr.H1("Figures"),
            wr.PanelGrid(runsets=[runset], panels=[wr.MediaBrowser(title="report figures",
                                                                   media_keys=text["figures"], num_columns=2)]),
            wr.H1("Training curves"),
            wr.PanelGrid(runsets=[runset], panels=_panels(panels)),
            wr.H1("Commands"),
            # Shell commands; the block's languages have no shell, and yaml highlights them least wrongly.
            wr.CodeBlock(code="\n".join(text["commands"]), language="yaml"),
            wr.H1("Provenance"),
            wr.UnorderedList(items=text["provenance"] or ["(no provenance.json found)"]),
        ],
    )


# --------------------------------------------------------------------------- publishing


def default_entity() -> str:
    import wandb

    entity = wandb.Api().default_entity
    if not entity:
        raise RuntimeError("the W&B server named no default entity for this API key; set tracker.entity")
    return entity


def publish(spec: dict[str, Any], view: bool = True, report: bool = True) -> list[str]:
    """Save the view and (where the spec has one) the report on the W&B server; their URLs."""
    entity = spec["entity"] or default_entity()
    # Both built before either is saved: a spec the library's classes refuse saves nothing.
    built = ([build_workspace(spec, entity)] if view else []) + \
        ([build_report(spec, entity)] if report and "report" in spec else [])
    return [thing.save().url for thing in built]


def after_command(directory: Path, say: Any = print, report: bool = False) -> None:
    """At the end of a study or sweep (its view) or a report (`report`: the W&B Report only):
    write the specification and, when the runs went online, publish it; offline, say the one
    command that publishes it after `wandb sync`. Any failure is one line: the command's own
    result never depends on the W&B server."""
    try:
        spec = view_spec(directory)
        path = write_spec(directory, spec)
    except NothingTracked:
        return
    except Exception as exc:
        say(f"W&B view: not written ({type(exc).__name__}: {first_line(exc)})")
        return
    if not spec["online"]:
        say(f"W&B view: {path}; after `wandb sync`, publish it with: {spec['publish']}")
        return
    try:
        for url in publish(spec, view=not report, report=report):
            say(f"W&B view: {url}")
    except Exception as exc:
        say(f"W&B view: not published ({type(exc).__name__}: {first_line(exc)}); "
            f"to publish it later: {spec['publish']}")
