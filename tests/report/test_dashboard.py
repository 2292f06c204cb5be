"""The saved W&B view of a study and the W&B Report of `dropstudy report`: built with
wandb_workspaces' own classes from a real (offline) study's directory, and published to a small
GraphQL server on 127.0.0.1 that records what W&B's client sends it (no W&B server is reached)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
from conftest import clean_environment
from matplotlib.colors import to_hex

from dropstudy.report import dashboard
from dropstudy.report.plots import COLORS

FAKE_KEY = "k" * 40
STUDY = ["study", "trainer.epochs=4", "trainer.eval_every=2", "study.arms=[0.0,0.5]", "tracker.watch=all",
         "hydra.run.dir=study"]


class FakeWandb:
    """Answers the GraphQL calls wandb_workspaces makes (viewer, projects, project id, upsertView)
    with the least valid JSON, and keeps every query it was sent. `fail_upserts`: upsertView
    answers with a GraphQL error, as a server that refuses the view would."""

    def __init__(self, fail_upserts: bool = False):
        self.queries: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = json.loads(body) if self.path.startswith("/graphql") else {}
                answer = fake.answer(request) if request else {}
                payload = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.fail_upserts = fail_upserts
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, request: dict) -> dict:
        self.queries.append(request)
        query, variables = request.get("query", ""), request.get("variables") or {}
        if "upsertView" in query:
            if self.fail_upserts:
                return {"errors": [{"message": "views are switched off on this server"}], "data": None}
            view = {"id": "Vmlldzox", "name": variables.get("name") or "nw-fake-v", "displayName":
                    variables.get("displayName"), "type": variables.get("type"), "description": "",
                    "spec": variables.get("spec"), "project": {"name": variables.get("projectName"),
                                                               "entityName": variables.get("entityName")},
                    "createdAt": "2026-01-01T00:00:00", "updatedAt": "2026-01-01T00:00:00",
                    "user": {"username": "tester"}}
            return {"data": {"upsertView": {"view": view, "inserted": True}}}
        if "models(" in query:  # the entity's projects
            node = {"__typename": "Project", "id": "UHJvamVjdDox", "name": "dropstudy", "entityName": "tester",
                    "createdAt": "2026-01-01T00:00:00", "isBenchmark": False, "user": None}
            return {"data": {"models": {"pageInfo": {"__typename": "PageInfo", "endCursor": None,
                                                     "hasNextPage": False}, "edges": [{"node": node}]}}}
        if "project(" in query:
            return {"data": {"project": {"internalId": "UHJvamVjdDox", "id": "UHJvamVjdDox"}}}
        if "viewer" in query:
            return {"data": {"viewer": {"id": "VXNlcjox", "entity": "tester", "username": "tester",
                                        "email": None, "flags": None, "teams": {"edges": []}}}}
        return {"data": {}}

    def upserts(self) -> list[dict]:
        return [q["variables"] for q in self.queries if "upsertView" in q.get("query", "")]

    def __enter__(self) -> "FakeWandb":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def offline_study(tmp_path_factory) -> Path:
    """One real two-arm regression study, tracked offline, then reported on (shared: read only)."""
    where = tmp_path_factory.mktemp("offline_study")
    env = clean_environment(where)
    run = lambda *args: subprocess.run([sys.executable, "-m", "dropstudy", *args], cwd=where, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    study = run(*STUDY)
    assert study.returncode == 0, study.stdout + study.stderr
    study_dir = where / "study"
    assert (f"W&B view: {study_dir / 'wandb_view.json'}; after `wandb sync`, publish it with: "
            f"dropstudy dashboard {study_dir}") in study.stdout, study.stdout
    report = run("report", "study")
    assert report.returncode == 0, report.stdout + report.stderr
    return where / "study"


@pytest.fixture
def study_copy(offline_study: Path, tmp_path: Path, monkeypatch) -> Path:
    copy = tmp_path / "study"
    shutil.copytree(offline_study, copy, symlinks=True)
    monkeypatch.chdir(tmp_path)
    return Path("study")


def arm_summaries(study: Path) -> dict[str, dict]:
    return {arm: json.loads((study / arm / "summary.json").read_text()) for arm in ("dropout-0", "dropout-0.5")}


def test_study_writes_a_view_spec_its_group_grouped_and_coloured_as_the_figures(offline_study: Path):
    spec = json.loads((offline_study / dashboard.VIEW_FILE).read_text())
    record = json.loads((offline_study / "study.json").read_text())
    summaries = arm_summaries(offline_study)
    assert spec["group"] == record["group"] == summaries["dropout-0"]["wandb"]["group"]
    assert spec["grouping"] == ["model.dropout"]  # the kind and sites do not vary in this study
    # The arms' colours are the ones study_curves draws them in: COLORS in arm order.
    assert spec["run_colors"] == {summaries["dropout-0"]["wandb"]["run_id"]: to_hex(COLORS[0]),
                                  summaries["dropout-0.5"]["wandb"]["run_id"]: to_hex(COLORS[1])}
    # `dropstudy report study` wrote it last, with the report's part and the directory as given.
    assert spec["online"] is False and spec["publish"] == "dropstudy dashboard study" and "report" in spec

    view = dashboard.build_workspace(spec, entity="tester")._to_model()
    (runset,) = view.spec.section.run_sets
    assert runset.filters["filters"] == [{"key": {"section": "run", "name": "group"}, "op": "=",
                                          "value": record["group"], "disabled": False}]
    assert [key.model_dump()["name"] for key in runset.grouping] == ["model.dropout.value"]
    colors = view.spec.section.custom_run_colors
    assert {k: v for k, v in colors.items() if k in spec["run_colors"]} == spec["run_colors"]
    groups = {k: v for k, v in colors.items() if k.startswith("run-color-group:")}  # one per rate's group
    assert sorted(groups.values()) == sorted([to_hex(COLORS[0]), to_hex(COLORS[1])])
    assert all("model.dropout.value" in unquote(k) for k in groups)
    sections = {s.name: s for s in view.spec.section.panel_bank_config.sections}
    assert list(sections) == ["Loss", "Generalisation gap", "Dropout rates and weight norms",
                              "Gradient and parameter histograms", "Figures"]  # regression: no accuracy

    def configs(name: str) -> list[dict]:
        return [p.model_dump(by_alias=True, exclude_none=True)["config"] for p in sections[name].panels]

    assert configs("Loss")[0]["metrics"] == ["train/loss", "train_eval/loss", "val/loss"]
    assert configs("Loss")[0]["xAxis"] == "epoch"
    assert [c["metrics"] for c in configs("Generalisation gap")] == [["gap/loss"], ["gap/acc"]]
    assert [c["metricRegex"] for c in configs("Dropout rates and weight norms")] == ["^dropout/p/.*", "^weights/l2/.*"]
    assert [c["metricRegex"] for c in configs("Gradient and parameter histograms")] == ["^gradients/.*",
                                                                                     "^parameters/.*"]
    media = json.dumps(configs("Figures"))
    for key in ("study/study_curves", "study/weight_norms", "plots/learning_curves", "plots/regression_fit"):
        assert key in media


def test_dashboard_publishes_exactly_one_view_with_the_group_and_grouping(study_copy: Path, tmp_path: Path):
    env = clean_environment(tmp_path)
    group = json.loads((study_copy / "study.json").read_text())["group"]
    with FakeWandb() as server:
        env.update(WANDB_BASE_URL=server.url, WANDB_API_KEY=FAKE_KEY)
        (study_copy / "report").rename(study_copy / "report-aside")  # the view alone
        done = subprocess.run([sys.executable, "-m", "dropstudy", "dashboard", str(study_copy)], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    (upsert,) = server.upserts()
    assert upsert["type"] == "project-view" and upsert["entityName"] == "tester"
    assert upsert["projectName"] == "dropstudy"
    spec = json.loads(upsert["spec"])
    (runset,) = spec["section"]["runSets"]
    assert group in json.dumps(runset["filters"])
    assert runset["grouping"] == [{"section": "config", "name": "model.dropout.value"}]
    assert f"W&B: {server.url}/tester/dropstudy?nw=" in done.stdout


def test_report_publishes_one_report_with_the_table_figures_commands(study_copy: Path, tmp_path: Path,
                                                                     monkeypatch):
    for key, value in clean_environment(tmp_path).items():
        monkeypatch.setenv(key, value)
    spec = dashboard.view_spec(study_copy)
    table = (study_copy / "report" / "report.csv").read_text().splitlines()
    with FakeWandb() as server:
        monkeypatch.setenv("WANDB_BASE_URL", server.url)
        monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
        urls = dashboard.publish(spec, view=False, report=True)
    (upsert,) = server.upserts()
    assert upsert["type"] == "runs" and len(urls) == 1
    text = upsert["spec"]
    assert spec["group"] in text and "model.dropout" in text
    header = table[0].split(",")
    assert all(column in text for column in header[:4])  # report.csv's table, as a markdown table
    assert "report/regression_vs_dropout" in text  # the figures the report run logged
    assert "dropstudy report study" in text and "data sha256" in text  # the commands, the provenance


def test_a_refusing_server_is_one_line_and_raises_nothing(study_copy: Path, tmp_path: Path, monkeypatch):
    for key, value in clean_environment(tmp_path).items():
        monkeypatch.setenv(key, value)
    for arm in ("dropout-0", "dropout-0.5"):  # as if the arms had gone online
        path = study_copy / arm / "summary.json"
        summary = json.loads(path.read_text())
        summary["wandb"]["url"] = f"https://wandb.example/{arm}"
        path.write_text(json.dumps(summary))
    said: list[str] = []
    with FakeWandb(fail_upserts=True) as server:
        monkeypatch.setenv("WANDB_BASE_URL", server.url)
        monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
        dashboard.after_command(study_copy, say=said.append)
    assert len(server.upserts()) == 1
    assert len(said) == 1 and said[0].startswith("W&B view: not published (") and "dropstudy dashboard study" in said[0]


def test_dashboard_refuses_a_bad_directory_in_one_line(dropstudy, tmp_path: Path):
    missing = dropstudy("dashboard", "nowhere")
    assert missing.code == 2 and missing.stderr.strip().count("\n") == 0 and "nowhere" in missing.stderr
    (tmp_path / "plain").mkdir()
    plain = dropstudy("dashboard", "plain")
    assert plain.code == 2 and "study.json" in plain.stderr and "Traceback" not in plain.stderr
    assert not (tmp_path / "plain" / dashboard.VIEW_FILE).exists()
