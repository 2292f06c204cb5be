"""The documentation: the generated references cover every config key and every command, and the
site builds with `mkdocs build --strict` (broken links and anchors fail it)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from conftest import REPO, python_path
from omegaconf import DictConfig

from dropstudy.cli import app
from dropstudy.config.compose import compose

EXPERIMENTS = ("regression", "cifar10")


def load_gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen_docs():
    return load_gen_docs()


def leaf_keys(cfg: DictConfig, prefix: str = "") -> set[str]:
    keys = set()
    for key in cfg.keys():
        child = cfg._get_node(key)
        if isinstance(child, DictConfig):
            keys |= leaf_keys(child, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def reference_rows(page: str) -> dict[str, list[list[str]]]:
    """Key -> the cells of each table row that documents it (a key may have a row per model)."""
    rows: dict[str, list[list[str]]] = {}
    for line in page.splitlines():
        match = re.match(r"^\| `([^`]+)` \|(.*)\|$", line)
        if match:
            rows.setdefault(match.group(1), []).append([c.strip() for c in re.split(r"(?<!\\)\|", match.group(2))])
    return rows


def test_config_reference_lists_every_composed_key_with_its_values(gen_docs):
    page = gen_docs.render_config_reference()
    rows = reference_rows(page)
    composed = gen_docs.composed_configs()
    for experiment in EXPERIMENTS:
        cfg = compose([f"experiment={experiment}"])
        unresolved = composed[experiment]
        for key in sorted(leaf_keys(cfg)):
            assert key in rows, f"{key} (experiment={experiment}) is missing from the configuration reference"
            # The value this experiment composes is the row's default or what the experiment sets.
            shown = gen_docs.value_text(gen_docs.unresolved(unresolved, key))
            assert any(shown in cells[1] or f"{experiment}: {shown}" in cells[2] for cells in rows[key]), (
                f"{key}: the reference does not show {shown} for experiment={experiment}: {rows[key]}")
            assert all(cells[3] for cells in rows[key]), f"{key}: the reference says nothing about it"
    assert "| `trainer.epochs` | int | `1` | regression: `2000`; cifar10: `15` |" in page
    assert "`hydra.launcher.signal_delay_s` | `120` |" in page


def test_fallback_descriptions_only_cover_fields_without_a_comment(gen_docs):
    """A description kept in gen_docs.py names a schema field that config.py leaves uncommented,
    so the two never both describe one key."""
    comments = gen_docs.field_comments()
    for name in gen_docs.FALLBACK:
        cls, _, field = name.partition(".")
        assert (cls, field) in comments, f"FALLBACK[{name!r}]: config.py declares no such field"
        assert not comments[(cls, field)], f"FALLBACK[{name!r}]: config.py now comments it; drop the entry"


def test_cli_reference_lists_every_command_with_its_options(gen_docs):
    page = gen_docs.render_cli_reference()
    root = typer.main.get_command(app)
    assert root.commands, "the Typer app registers no commands"
    for name, command in root.commands.items():
        assert f"## dropstudy {name}\n" in page
        assert f"Usage: dropstudy {name} " in page
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("-"):
                    assert opt in page, f"dropstudy {name} {opt} is missing from the CLI reference"


def test_readme_links_resolve():
    readme = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if not re.match(r"^[a-z]+:", t)]
    assert local, "the README links no docs page"
    missing = [t for t in local if not (REPO / t).exists()]
    assert not missing, f"README.md links files that do not exist: {missing}"
    assert len(readme.splitlines()) <= 200, "README.md is the front page; move detail to docs/"


def test_mkdocs_build_strict(tmp_path: Path):
    for module in ("mkdocs", "material"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: pip install -e '.[docs]' (make install does)")
    site = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": python_path(), "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d", str(site)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config_page = (site / "reference" / "config" / "index.html").read_text()
    assert "trainer.eval_every" in config_page and "hydra.launcher.partition" in config_page
    assert "dropstudy report" in (site / "reference" / "cli" / "index.html").read_text()
    # The studies page shows the README's results section, its figure links made relative to docs/.
    studies = (site / "studies" / "index.html").read_text()
    assert "gap/loss" in studies and 'src="../report_learning_curves.png"' in studies
