"""report.html, opened as a user would: a real sweep and `dropstudy report`, a real study, and the
pages they write loaded from file:// in headless Chromium (the system's, driven by Playwright).

The page must make no request but for itself, draw every figure, show the numbers report.csv
holds (rounded as the tables round them) and fit a phone's width; the same checks on the text
catch an external script, stylesheet or font before any browser runs.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clean_environment, read_figure
from typer.testing import CliRunner

from dropstudy.cli import app
from dropstudy.report.tables import EFFECT, MEAN, NA, P, _format

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` on PATH (apt-get install -y chromium)")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]
PHONE, DESKTOP = 390, 1280
TRAIN_EVAL = "train (eval mode)"


def dropstudy_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dropstudy", *args], cwd=cwd, env=clean_environment(cwd),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dropout 0 and 0.5 on the same three seeds (so every comparison is paired), untracked."""
    tmp = tmp_path_factory.mktemp("html_sweep")
    dropstudy_cli(tmp, "sweep", "model.dropout=0,0.5", "seed=0,1,2", "trainer.epochs=20", "trainer.eval_every=5",
                  "tracker.mode=disabled", "hydra.sweep.dir=sw")
    return tmp / "sw"


def report_on(directory: Path) -> Path:
    result = CliRunner().invoke(app, ["report", str(directory)], prog_name="dropstudy")
    assert result.exit_code == 0, result.output
    page = directory / "report" / "report.html"
    assert f"wrote {page}" in result.output
    return page


def assert_self_contained(html: str) -> None:
    """Nothing in the text that a browser would fetch: no script or stylesheet from a file or the
    web, no url() or @import, no image source, and no SVG doctype (it names a DTD on the web)."""
    for pattern in (r"<script\b[^>]*\bsrc", r"<link\b[^>]*\bhref\s*=\s*[\"']?\s*(https?:|//)", r"url\(\s*[\"']?\s*(https?:|//)",
                    r"@import", r"<(img|iframe|object|embed|source|video|audio)\b", r"<!DOCTYPE svg", r"<\?xml",
                    r"<link\b"):
        assert not re.search(pattern, html, flags=re.I), pattern
    assert '<meta name="viewport"' in html
    assert "@media print" in html


def csv_rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open() as fh:
        return {(row["metric"], row["model.dropout"]): row for row in csv.DictReader(fh)}


def expected_cells(row: dict[str, str]) -> dict[str, str]:
    """What each column of the page's table must read for one report.csv line, rounded as the
    report's tables round (three significant digits; p two; effect sizes two decimals)."""
    def num(key: str, spec: str = MEAN) -> str:
        return NA if row[key] == "" else _format(float(row[key]), spec)

    def interval(low: str, high: str) -> str:
        return NA if row[low] == "" else f"[{num(low)}, {num(high)}]"

    cells = {"n": row["n"], "mean ± std": num("mean") + (f" ± {num('std')}" if row["std"] else ""),
             "95% CI": interval("ci_low", "ci_high")}
    if row["baseline"] == "self":
        return {**cells, "Δ vs baseline": "baseline"}
    return {**cells, "Δ vs baseline": num("diff"), "95% CI of Δ": interval("diff_ci_low", "diff_ci_high"),
            "p (paired t)": num("p_t", P), "p (Wilcoxon)": num("p_wilcoxon", P), "d_z": num("effect", EFFECT),
            "wins": f"{int(float(row['wins']))}/{row['n_pairs']}" if row["wins"] else NA}


def browse(page_path: Path, screenshots: Path) -> dict:
    """Open the page at a desktop and a phone width: every request and failed request, each inline
    SVG's drawn size, the page's width against the window's, the metrics tables' cells, and a
    full-page screenshot of each."""
    from playwright.sync_api import sync_playwright

    seen: dict = {"requests": [], "failed": []}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            for name, width in (("desktop", DESKTOP), ("phone", PHONE)):
                page = browser.new_page(viewport={"width": width, "height": 900})
                page.on("request", lambda r: seen["requests"].append(r.url))
                page.on("requestfailed", lambda r: seen["failed"].append(r.url))
                page.goto(page_path.as_uri(), wait_until="load")
                seen[name] = page.evaluate("""() => ({
                    svgs: [...document.querySelectorAll('svg')].map(s => {
                        const r = s.getBoundingClientRect(); return [r.width, r.height]; }),
                    pageWidth: document.documentElement.scrollWidth,
                    tables: [...document.querySelectorAll('table.metrics')].map(t => ({
                        header: [...t.querySelectorAll('thead th')].map(th => th.textContent.trim()),
                        rows: [...t.querySelectorAll('tbody tr')].map(
                            tr => [...tr.querySelectorAll('td')].map(td => td.textContent.trim()))})),
                    svgText: [...document.querySelectorAll('#arms svg text')].map(t => t.textContent),
                    ids: [...document.querySelectorAll('[id]')].map(e => e.id),
                })""")
                page.screenshot(path=str(screenshots / f"{name}.png"), full_page=True)
                page.emulate_media(media="print")
                seen[name]["print"] = page.evaluate("""() => ({
                    nav: getComputedStyle(document.querySelector('nav')).display,
                    sections: [...document.querySelectorAll('section')].map(s => getComputedStyle(s).breakBefore),
                    figures: [...document.querySelectorAll('figure')].map(f => getComputedStyle(f).breakInside),
                })""")
                page.close()
        finally:
            browser.close()
    return seen


def assert_page_shows(seen: dict, page_path: Path, screenshots: Path, figures: int) -> None:
    assert seen["requests"] == [page_path.as_uri()] * 2  # the file itself, once per width
    assert seen["failed"] == []
    for name, width in (("desktop", DESKTOP), ("phone", PHONE)):
        sizes = seen[name]["svgs"]
        assert len(sizes) == figures, sizes
        assert all(w > 0 and h > 0 for w, h in sizes), sizes
        assert all(w <= width for w, _ in sizes), (name, sizes)
        # A wide table scrolls inside its wrapper; the page itself never scrolls sideways.
        assert seen[name]["pageWidth"] <= width, (name, seen[name]["pageWidth"])
        read_figure(screenshots / f"{name}.png", min_width=width, min_height=900)
        # matplotlib names every figure's parts alike (figure_1, axes_1): inlined, they must not clash.
        ids = seen[name]["ids"]
        assert len(ids) == len(set(ids)), sorted(i for i in set(ids) if ids.count(i) > 1)[:5]
        printed = seen[name]["print"]
        assert printed["nav"] == "none"
        assert printed["sections"][0] == "auto" and set(printed["sections"][1:]) == {"page"}
        assert set(printed["figures"]) == {"avoid"}


@needs_chromium
def test_report_html_in_a_browser_shows_report_csv_and_every_figure(sweep_dir: Path, tmp_path: Path):
    page = report_on(sweep_dir)
    html = page.read_text()
    assert_self_contained(html)
    # The report's three figures (vs dropout, learning curves, regression fit) and the per-arm curves.
    assert html.count("<svg") == 4
    assert f"dropstudy report {sweep_dir.resolve()}" in html
    assert "dropstudy sweep model.dropout=0,0.5 seed=0,1,2" in html  # the command that made the runs
    commit = json.loads((sweep_dir / "0" / "provenance.json").read_text())["git"]["commit"]
    assert str(commit) in html

    seen = browse(page, tmp_path)
    assert_page_shows(seen, page, tmp_path, figures=4)

    expected = csv_rows(sweep_dir / "report" / "report.csv")
    (table,) = seen["desktop"]["tables"]
    assert seen["phone"]["tables"] == [table]
    shown_rows = [dict(zip(table["header"], cells)) for cells in table["rows"]]
    csv_names = {"best epoch (val/loss)": "val/loss_epoch", "best val/loss": "val/loss_best"}
    keys = [(csv_names.get(s["metric"], s["metric"]), s["model.dropout"]) for s in shown_rows]
    assert sorted(keys) == sorted(expected)  # every line of report.csv, once
    checked = set()
    for shown, key in zip(shown_rows, keys):
        want = expected_cells(expected[key])
        assert {k: shown[k] for k in want} == want, key
        checked |= set(want)
    assert {"mean ± std", "95% CI", "95% CI of Δ", "p (paired t)", "p (Wilcoxon)", "d_z", "wins"} <= checked
    # These runs log the eval-mode training loss beside the training-mode one: each arm's panel draws both.
    assert "train (dropout on)" in seen["desktop"]["svgText"] and TRAIN_EVAL in seen["desktop"]["svgText"]


def test_report_html_draws_the_eval_mode_training_curve_where_runs_logged_it(sweep_dir: Path, tmp_path: Path):
    """Runs that log `train_eval/loss` (the training data with dropout off) get it in each arm's
    panel; the sweep above, whose runs predate it, does not (checked in the browser test)."""
    runs = tmp_path / "runs"
    shutil.copytree(sweep_dir, runs, ignore=shutil.ignore_patterns("report"))
    for metrics in runs.glob("*/metrics.jsonl"):
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        for row in rows:
            if "val/loss" in row:
                row["train_eval/loss"] = row["val/loss"] / 2
        metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    html = report_on(runs).read_text()
    arms = html[html.index('<section id="arms">'):html.index('<section id="provenance">')]
    assert arms.count(f">{TRAIN_EVAL}<") == 2  # one legend entry in each setting's panel
    assert arms.count(">train (dropout on)<") == 2


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("html_study")
    proc = dropstudy_cli(tmp, "study", "trainer.epochs=10", "trainer.eval_every=5", "tracker.mode=disabled",
                         "hydra.run.dir=st")
    return tmp / "st", proc.stdout


@needs_chromium
def test_every_study_writes_report_html_with_its_comparison(study: tuple[Path, str], tmp_path: Path):
    study_dir, printed = study
    page = study_dir / "report.html"
    assert f"comparison page: {page}" in printed
    html = page.read_text()
    assert_self_contained(html)
    # study_curves, weight_norms and regression_fit as the study draws them, and the per-arm curves.
    figures = json.loads((study_dir / "study.json").read_text())["figures"]
    assert set(figures) == {"study_curves", "weight_norms", "regression_fit"}
    assert html.count("<svg") == len(figures) + 1
    assert "dropstudy study trainer.epochs=10" in html
    seen = browse(page, tmp_path)
    assert_page_shows(seen, page, tmp_path, figures=len(figures) + 1)
    # One seed per arm: the table's means are the arms' own final values.
    (table,) = seen["desktop"]["tables"]
    finals = {arm: json.loads((study_dir / arm / "summary.json").read_text())["final"]
              for arm in ("dropout-0", "dropout-0.5")}
    checked = 0
    for cells in table["rows"]:
        shown = dict(zip(table["header"], cells))
        final = finals[f"dropout-{float(shown['model.dropout']):g}"]
        if shown["metric"] in final:
            assert shown["n"] == "1" and shown["mean ± std"] == _format(final[shown["metric"]], MEAN), shown
            checked += 1
    assert checked >= 8  # train, val, test and gap loss of both arms


def test_user_text_is_escaped(tmp_path: Path):
    """A path or command with markup in it shows as text: it never becomes an element."""
    from dropstudy.report.html import render

    root = tmp_path / "<script>alert(1)</script>"
    html = render("t", root, [], [], [], [], [(root / "a&b", "failed")], [("made the runs", "x='<b>' && y")])
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "x=&#39;&lt;b&gt;&#39; &amp;&amp; y" in html
    assert_self_contained(html)
