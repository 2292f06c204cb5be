"""`dropstudy report`'s statistics and exports, on run directories written here the way real runs
lay them out (.hydra/config.yaml, summary.json, metrics.jsonl) with final metrics chosen so the
answer is known: every interval and p-value is checked against one computed here by hand (numpy
and the t distribution's quantiles), and report.tex, report.md and report.csv against each other."""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf
from scipy import stats as sps
from typer.testing import CliRunner

from dropstudy.cli import app
from dropstudy.config.compose import compose


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), prog_name="dropstudy")


@pytest.fixture(scope="module")
def base_config() -> dict:
    return OmegaConf.to_container(compose(["trainer.epochs=40", "trainer.eval_every=10"]), resolve=True, enum_to_str=True)


def write_run(path: Path, config: dict, dropout: float, seed: int, test_loss: float, train_loss: float = 0.1) -> None:
    """One finished regression run: its config as Hydra saves it, its summary, its metrics rows."""
    cfg = copy.deepcopy(config)
    cfg["model"]["dropout"], cfg["seed"] = dropout, seed
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    val_loss = test_loss * 1.1
    rows = [{"epoch": e, "train/loss": train_loss * 40 / e, "val/loss": val_loss * (1 + 10 / e)} for e in (10, 20, 30, 40)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = {"train/loss": train_loss, "val/loss": val_loss, "test/loss": test_loss, "gap/loss": val_loss - train_loss}
    summary = {"status": "finished", "experiment": "regression", "seed": seed, "dropout": dropout,
               "final": final, "best": {"val/loss": val_loss, "val/loss_epoch": 40}, "wandb": {"run_id": None}}
    (path / "summary.json").write_text(json.dumps(summary))


def write_study(root: Path, config: dict, arms: dict[float, dict[int, float]]) -> Path:
    """A sweep-shaped directory: one numbered job per (dropout, seed), test/loss as given."""
    for job, (dropout, seed, loss) in enumerate((p, s, v) for p, by_seed in arms.items() for s, v in by_seed.items()):
        write_run(root / str(job), config, dropout, seed, loss)
    return root


def read_csv(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open() as fh:
        return {(r["model.dropout"], r["metric"]): r for r in csv.DictReader(fh)}


def mean_interval(xs: np.ndarray) -> tuple[float, float, float]:
    half = sps.t.ppf(0.975, len(xs) - 1) * xs.std(ddof=1) / math.sqrt(len(xs))
    return xs.mean(), xs.mean() - half, xs.mean() + half


def exact_wilcoxon(d: np.ndarray) -> float:
    """Two-sided exact signed-rank p-value by enumerating all 2^n sign patterns (no ties, no zeros)."""
    ranks = sps.rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    centre = len(d) * (len(d) + 1) / 4
    totals = np.array([sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product((0, 1), repeat=len(d))])
    return float(np.mean(np.abs(totals - centre) >= abs(observed - centre) - 1e-9))


SEEDS = range(8)
RNG = np.random.default_rng(1234)
BASE = 0.25 + 0.1 * RNG.random(len(SEEDS))  # the baseline's test loss per seed
NOISE = 0.02 * RNG.standard_normal(len(SEEDS))
SHIFT = -0.07  # dropout lowers the test loss by this much on average


def test_paired_by_seed_difference_interval_and_tests_match_a_hand_computation(base_config, tmp_path):
    other = BASE + SHIFT + NOISE
    root = write_study(tmp_path / "sw", base_config, {0.0: dict(zip(SEEDS, BASE)), 0.5: dict(zip(SEEDS, other))})
    result = invoke("report", str(root))
    assert result.exit_code == 0, result.output
    rows = read_csv(root / "report" / "report.csv")

    for dropout, values in (("0.0", BASE), ("0.5", other)):
        row = rows[(dropout, "test/loss")]
        mean, low, high = mean_interval(values)
        assert int(row["n"]) == len(SEEDS)
        assert float(row["mean"]) == pytest.approx(mean, rel=1e-12)
        assert float(row["std"]) == pytest.approx(values.std(ddof=1), rel=1e-12)
        assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((low, high), rel=1e-9)

    d = other - BASE
    mean, low, high = mean_interval(d)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    row = rows[("0.5", "test/loss")]
    assert row["test"] == "paired t" and row["baseline"] == "dropout=0.0"
    assert float(row["diff"]) == pytest.approx(mean, rel=1e-9)
    assert (float(row["diff_ci_low"]), float(row["diff_ci_high"])) == pytest.approx((low, high), rel=1e-9)
    assert high < 0, "a shift of -0.07 against noise of 0.02: the interval excludes 0"
    assert float(row["p_t"]) == pytest.approx(2 * sps.t.sf(abs(t), len(d) - 1), rel=1e-9)
    assert float(row["p_wilcoxon"]) == pytest.approx(exact_wilcoxon(d), rel=1e-9)
    assert float(row["effect"]) == pytest.approx(d.mean() / d.std(ddof=1), rel=1e-9) and row["effect_size"] == "d_z"
    assert row["wins"] == str(int((d < 0).sum()))
    assert rows[("0.0", "test/loss")]["baseline"] == "self" and rows[("0.0", "test/loss")]["diff"] == ""

    # The printed table says which tests made its p-values, and shows the same interval.
    output = " ".join(result.output.split())
    assert "paired t-test and Wilcoxon signed-rank test" in output
    assert f"[{low:.3g}, {high:.3g}]" in output


def test_no_difference_interval_covers_zero(base_config, tmp_path):
    # Differences of +a and -a on pairs of seeds: the mean difference is 0, so must be the verdict.
    spread = np.array([0.03, -0.03, 0.05, -0.05, 0.01, -0.01, 0.02, -0.02])
    root = write_study(tmp_path / "sw", base_config, {0.0: dict(zip(SEEDS, BASE)), 0.5: dict(zip(SEEDS, BASE + spread))})
    assert invoke("report", str(root)).exit_code == 0
    row = read_csv(root / "report" / "report.csv")[("0.5", "test/loss")]
    d = (BASE + spread) - BASE
    _, low, high = mean_interval(d)
    assert float(row["diff_ci_low"]) < 0 < float(row["diff_ci_high"])
    assert (float(row["diff_ci_low"]), float(row["diff_ci_high"])) == pytest.approx((low, high), rel=1e-9)
    assert float(row["p_t"]) == pytest.approx(1.0, abs=1e-6)
    assert float(row["p_wilcoxon"]) == pytest.approx(exact_wilcoxon(d), rel=1e-9)
    assert row["wins"] == "4"


def test_different_seeds_are_compared_with_welch(base_config, tmp_path):
    other = 0.2 + 0.08 * RNG.random(6)
    root = write_study(tmp_path / "sw", base_config,
                       {0.0: dict(zip(SEEDS, BASE)), 0.5: dict(zip(range(100, 106), other))})
    result = invoke("report", str(root))
    assert result.exit_code == 0, result.output
    row = read_csv(root / "report" / "report.csv")[("0.5", "test/loss")]
    v1, v0, n1, n0 = other.var(ddof=1), BASE.var(ddof=1), len(other), len(BASE)
    se = math.sqrt(v1 / n1 + v0 / n0)
    df = se**4 / ((v1 / n1) ** 2 / (n1 - 1) + (v0 / n0) ** 2 / (n0 - 1))
    diff = other.mean() - BASE.mean()
    half = sps.t.ppf(0.975, df) * se
    assert row["test"] == "Welch t" and row["n_pairs"] == "" and row["wins"] == ""
    assert float(row["diff"]) == pytest.approx(diff, rel=1e-9)
    assert (float(row["diff_ci_low"]), float(row["diff_ci_high"])) == pytest.approx((diff - half, diff + half),
                                                                                      rel=1e-9)
    assert float(row["p_t"]) == pytest.approx(2 * sps.t.sf(abs(diff / se), df), rel=1e-9)
    pooled = math.sqrt(((n1 - 1) * v1 + (n0 - 1) * v0) / (n1 + n0 - 2))
    assert float(row["effect"]) == pytest.approx(diff / pooled * (1 - 3 / (4 * (n1 + n0) - 9)), rel=1e-9)
    assert row["effect_size"] == "g" and row["p_wilcoxon"] == ""
    assert "Welch's t-test" in " ".join(result.output.split())
    assert "| p (Welch t) | p Holm (Welch t) | Hedges' g |" in (root / "report" / "report.md").read_text()
    assert float(row["p_t_holm"]) == float(row["p_t"]), "one setting against the baseline: nothing to adjust"


def test_one_seed_and_zero_spread_say_na_instead_of_crashing(base_config, tmp_path):
    # Multiples of 1/8: the shift is exactly the same on every seed, so the differences have no spread.
    root = write_study(tmp_path / "flat", base_config,
                       {0.0: {0: 0.125, 1: 0.25, 2: 0.375}, 0.5: {0: 0.375, 1: 0.5, 2: 0.625}})
    result = invoke("report", str(root))
    assert result.exit_code == 0, result.output
    row = read_csv(root / "report" / "report.csv")[("0.5", "test/loss")]
    assert (float(row["diff"]), float(row["diff_ci_low"]), float(row["diff_ci_high"])) == (0.25, 0.25, 0.25)
    assert row["p_t"] == "" and row["effect"] == "" and row["wins"] == "0"
    assert "no spread" in (root / "report" / "report.md").read_text()

    root = write_study(tmp_path / "one", base_config, {0.0: {0: 0.3}, 0.5: {0: 0.2}})
    result = invoke("report", str(root))
    assert result.exit_code == 0, result.output
    rows = read_csv(root / "report" / "report.csv")
    assert rows[("0.5", "test/loss")]["ci_low"] == "" and rows[("0.5", "test/loss")]["diff_ci_low"] == ""
    assert float(rows[("0.5", "test/loss")]["diff"]) == pytest.approx(-0.1)
    md = (root / "report" / "report.md").read_text()
    assert "| test/loss | 0.5 | 1 | 0.2 | n/a | -0.1 | n/a | n/a | n/a | n/a | n/a | n/a | 1/1 |" in md
    assert "one seed" in md


def holm_rejects(p_values: list[float], alpha: float) -> set[int]:
    """Holm's procedure as he stated it: test the smallest p at alpha/m, the next at alpha/(m-1),
    and so on, stopping at the first that fails; the indices of the hypotheses it rejects."""
    rejected: set[int] = set()
    for k, i in enumerate(sorted(range(len(p_values)), key=lambda i: p_values[i])):
        if p_values[i] > alpha / (len(p_values) - k):
            break
        rejected.add(i)
    return rejected


def test_p_values_are_holm_adjusted_across_the_settings_compared_with_the_baseline(base_config, tmp_path):
    shifts = {0.1: -0.004, 0.2: -0.012, 0.3: -0.03, 0.5: -0.07}  # p from large to tiny
    arms = {0.0: dict(zip(SEEDS, BASE))}
    arms.update({p: dict(zip(SEEDS, BASE + shift + NOISE * (1 + p))) for p, shift in shifts.items()})
    root = write_study(tmp_path / "sw", base_config, arms)
    result = invoke("report", str(root))
    assert result.exit_code == 0, result.output
    rows = read_csv(root / "report" / "report.csv")
    for test in ("p_t", "p_wilcoxon"):
        raw = [float(rows[(str(p), "test/loss")][test]) for p in shifts]
        adjusted = [float(rows[(str(p), "test/loss")][f"{test}_holm"]) for p in shifts]
        order = np.argsort(raw)
        m = len(raw)
        expected = np.empty(m)
        expected[order] = np.minimum(1, np.maximum.accumulate((m - np.arange(m)) * np.asarray(raw)[order]))
        assert adjusted == pytest.approx(expected.tolist(), rel=1e-12), test
        # The adjusted p is the smallest level at which Holm's procedure rejects that setting.
        for alpha in [*adjusted, *(a * (1 - 1e-9) for a in adjusted), 0.05]:
            assert {i for i, a in enumerate(adjusted) if a <= alpha} == holm_rejects(raw, alpha), (test, alpha)
        assert adjusted != raw, "the family adjusts something"
    md = (root / "report" / "report.md").read_text()
    assert "| p (paired t) | p Holm (paired t) | p (Wilcoxon) | p Holm (Wilcoxon) |" in md
    assert "Holm-adjusted for the settings compared with the baseline" in " ".join(md.split())
    # The best epoch's resolution is the runs' evaluation cadence (trainer.eval_every=10 here).
    assert "best epoch: the lowest val/loss among the evaluations (and its epoch), every 10 epochs." in " ".join(md.split())


def test_baseline_option_picks_the_setting_or_exits_2(base_config, tmp_path):
    root = write_study(tmp_path / "sw", base_config,
                       {0.0: dict(zip(SEEDS, BASE)), 0.5: dict(zip(SEEDS, BASE + SHIFT + NOISE))})
    assert invoke("report", str(root), "--baseline", "dropout=0.5").exit_code == 0
    rows = read_csv(root / "report" / "report.csv")
    assert rows[("0.5", "test/loss")]["baseline"] == "self"
    assert float(rows[("0.0", "test/loss")]["diff"]) == pytest.approx(-(SHIFT + NOISE).mean(), rel=1e-9)

    shutil.rmtree(root / "report")
    result = invoke("report", str(root), "--baseline", "model.dropout=0.3")
    assert result.exit_code == 2 and "--baseline model.dropout=0.3 matches no setting" in result.output
    assert "model.dropout takes 0.0, 0.5" in result.output
    result = invoke("report", str(root), "--baseline", "optim.lr=0.1")
    assert result.exit_code == 2 and "optim.lr: not a key that varies" in result.output
    assert "model.dropout" in result.output
    assert invoke("report", str(root), "--baseline", "dropout").exit_code == 2
    assert not (root / "report" / "report.csv").exists(), "a refused baseline writes nothing"


def _tex_rows(tex: str) -> list[list[str]]:
    """The body rows of each tabular: what lies between \\midrule and \\bottomrule, split on \\\\."""
    bodies = re.findall(r"\\midrule\n(.*?)\\bottomrule", tex, flags=re.DOTALL)
    assert bodies, tex
    lines = [line for body in bodies for line in body.replace("\\addlinespace\n", "").split("\\\\\n") if line.strip()]
    return [[cell.strip() for cell in line.split(" & ")] for line in lines]


def _numbers(text: str) -> list[float]:
    """The numbers a cell shows, whether written 1.2e-05 (plain) or $1.2\\times10^{-5}$ (LaTeX)."""
    text = re.sub(r"\\times10\^\{(-?\d+)\}", r"e\1", text)
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", text)]


def test_latex_markdown_and_csv_carry_the_same_numbers(base_config, tmp_path):
    root = write_study(tmp_path / "sw", base_config,
                       {0.0: dict(zip(SEEDS, BASE)), 0.3: dict(zip(SEEDS, BASE - 0.02 + NOISE)),
                        0.5: dict(zip(SEEDS, BASE + SHIFT + NOISE))})
    for run in root.glob("*/.hydra/config.yaml"):  # a LaTeX special in a setting key and value
        cfg = yaml.safe_load(run.read_text())
        cfg["model"]["dropout_kind"] = "inverted_50%" if cfg["model"]["dropout"] else "inverted"
        run.write_text(yaml.safe_dump(cfg))
    assert invoke("report", str(root)).exit_code == 0
    out = root / "report"
    tex = (out / "report.tex").read_text()
    assert "\\toprule" in tex and "model.dropout\\_kind" in tex and "inverted\\_50\\%" in tex
    body = _tex_rows(tex)
    metrics = ["train/loss", "val/loss", "test/loss", "gap/loss", "best val/loss", "best epoch (val/loss)"]
    assert len(body) == len(metrics) * 3, "one row per metric and setting"
    columns = tex.split("\\toprule\n")[1].split(" \\\\\n")[0].split(" & ")
    assert all(len(row) == len(columns) for row in body)

    md_rows = [line.strip("|").split(" | ") for line in (out / "report.md").read_text().splitlines()
               if line.startswith("| ") and not line.startswith("| metric")]
    assert len(md_rows) == len(body)
    with (out / "report.csv").open() as fh:
        csv_rows = list(csv.DictReader(fh))
    assert len(csv_rows) == len(body)
    for tex_row, md_row, csv_row in zip(body, md_rows, csv_rows):
        assert [_numbers(c) for c in tex_row] == [_numbers(c.strip()) for c in md_row]
        assert tex_row[0] == md_row[0].strip()
        # the CSV's unrounded numbers, rounded as the tables print them
        mean_std = _numbers(tex_row[4])
        assert mean_std == pytest.approx([float(f"{float(csv_row[k]):.3g}") for k in ("mean", "std")], rel=1e-12)
        if csv_row["diff"]:
            assert _numbers(tex_row[6]) == [float(f"{float(csv_row['diff']):.3g}")]
            assert _numbers(tex_row[7]) == [float(f"{float(csv_row[k]):.3g}") for k in ("diff_ci_low", "diff_ci_high")]
            assert _numbers(tex_row[8]) == ([float(f"{float(csv_row['p_t']):.2g}")] if csv_row["p_t"] else [])

    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed: report.tex was parsed but not compiled")
    doc = tmp_path / "paper.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage{booktabs,graphicx}\n\\begin{document}\n"
                   f"\\input{{{out / 'report.tex'}}}\n\\end{{document}}\n")
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (tmp_path / "paper.pdf").stat().st_size > 1000


def test_figures_are_one_column_wide_in_png_pdf_and_svg_with_labelled_axes(base_config, tmp_path):
    root = write_study(tmp_path / "sw", base_config,
                       {0.0: dict(zip(SEEDS, BASE)), 0.5: dict(zip(SEEDS, BASE + SHIFT + NOISE))})
    assert invoke("report", str(root)).exit_code == 0
    out = root / "report"
    for name in ("regression_vs_dropout", "regression_learning_curves"):
        pdf = (out / f"{name}.pdf").read_bytes()
        width = float(re.search(rb"/MediaBox \[ ?0 0 ([\d.]+) ", pdf).group(1))
        assert width == pytest.approx(3.4 * 72), name
        svg = (out / f"{name}.svg").read_text()
        assert re.search(r'<svg[^>]* width="244.8pt"', svg), name
        assert (out / f"{name}.png").stat().st_size > 10_000
    svg = (out / "regression_vs_dropout.svg").read_text()
    assert "dropout rate p (probability of dropping a unit)" in svg and "final MSE (unitless targets)" in svg
    svg = (out / "regression_learning_curves.svg").read_text()
    assert "epoch (one full-batch SGD step)" in svg and "MSE (unitless targets)" in svg
