"""Start-up: `--help` and every bad-input error are answered without importing torch, wandb or
matplotlib (seconds of imports a user would wait for to read one paragraph).

Each case runs the real CLI in a fresh interpreter, then lists the heavy modules that got imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dropstudy.cli import app

HEAVY = ("torch", "wandb", "matplotlib")

# The CLI as `dropstudy ARGS` runs it (main() ends the process, so the probe calls the app it
# runs), then one JSON line on stderr: the exit code and the heavy modules loaded.
PROBE = """
import json, sys
from dropstudy.cli import app
try:
    app(sys.argv[1:], prog_name="dropstudy")
    code = 0
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}), file=sys.stderr)
""" % (HEAVY,)


def probe(env: dict[str, str], cwd: Path, *args: str) -> tuple[int, list[str], str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    *text, last = proc.stderr.rstrip("\n").split("\n")
    report = json.loads(last)
    return report["code"], report["heavy"], proc.stdout + "\n".join(text)


COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)


@pytest.mark.parametrize("args", [("--help",), *((c, "--help") for c in COMMANDS)], ids=" ".join)
def test_help_imports_nothing_heavy(clean_env, tmp_path, args):
    code, heavy, output = probe(clean_env, tmp_path, *args)
    assert code == 0 and "Usage" in output
    assert heavy == []


def test_printing_the_config_imports_nothing_heavy(clean_env, tmp_path):
    """`--cfg` only composes: device auto and cpu resolve without asking torch."""
    code, heavy, output = probe(clean_env, tmp_path, "study", "--cfg", "device=cpu")
    assert code == 0 and "experiment: regression" in output and "device: cpu" in output
    assert heavy == []


BAD_INPUT = {
    "unknown key": (("train", "model.nope=1"), "model.nope: unknown key"),
    "out of range": (("train", "model.dropout=1.0"), "model.dropout=1.0"),
    "bad choice": (("study", "optim.name=adamw"), "optim.name='adamw'"),
    "study check": (("study", "model.dropout_kind=none"), "every arm of study.arms"),
    "sweep point": (("sweep", "model.dropout=0,1.5"), "model.dropout=1.5"),
    "no such experiment": (("train", "experiment=mnist"), "experiment=mnist: no such experiment"),
    "missing data": (("train", "experiment=cifar10", "data.root=missing"), "CIFAR-10 was not found"),
    "resume: missing dir": (("resume", "missing"), "missing: no such directory"),
    "rerun: missing dir": (("rerun", "missing"), "missing: no such directory"),
    "report: missing dir": (("report", "missing"), "missing: no such directory"),
    "demo: no such demo": (("demo", "nope"), "no demonstration called 'nope'"),
}


@pytest.mark.parametrize("case", BAD_INPUT, ids=str)
def test_bad_input_is_refused_without_heavy_imports(clean_env, tmp_path, case):
    args, message = BAD_INPUT[case]
    code, heavy, output = probe(clean_env, tmp_path, *args)
    assert code == 2 and message in output
    assert heavy == []


def test_the_probe_sees_torch_where_a_check_needs_it(clean_env, tmp_path):
    """Whether a CUDA device exists only torch can say: the control that the probe would notice."""
    code, heavy, output = probe(clean_env, tmp_path, "train", "device=cuda:99")
    assert code == 2 and "device=cuda:99" in output
    assert "torch" in heavy
