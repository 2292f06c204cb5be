"""A rerun's verdict: its metrics against the original's, what differs in their environments, and
the likely cause; which runs a study or sweep directory holds."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dropstudy.store.rundir import batch_record

# Wall-clock measurements differ between any two runs; they are not results.
NOT_RESULTS = ("perf/",)


@dataclass
class MetricDiff:
    key: str
    steps: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0


@dataclass
class Comparison:
    verdict: str  # identical | within tolerance | differs
    metrics: list[MetricDiff] = field(default_factory=list)
    first_difference: str | None = None

    @property
    def reproduces(self) -> bool:
        return self.verdict in ("identical", "within tolerance")


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if value in ("nan", "inf", "-inf"):
        return float(value)
    return None


def compare_metrics(original: list[dict], rerun: list[dict], rtol: float, atol: float) -> Comparison:
    """Rows are matched by position (the W&B step); a value reproduces when
    |a - b| <= atol + rtol * |a|, and NaN matches NaN."""
    diffs: dict[str, MetricDiff] = {}
    first: str | None = None
    exact = True
    for step in range(max(len(original), len(rerun))):
        a = original[step] if step < len(original) else None
        b = rerun[step] if step < len(rerun) else None
        if a is None or b is None:
            first = first or f"step {step}: the {'original' if a is None else 'rerun'} has no row there"
            exact = False
            continue
        for key in sorted((set(a) | set(b)) - {"epoch"}):
            if key.startswith(NOT_RESULTS):
                continue
            d = diffs.setdefault(key, MetricDiff(key))
            d.steps += 1
            va, vb = _number(a.get(key)), _number(b.get(key))
            if va is None or vb is None:
                if a.get(key) != b.get(key):
                    first = first or f"step {step} (epoch {a.get('epoch')}): {key} is {a.get(key)!r} vs {b.get(key)!r}"
                    exact = False
                continue
            if math.isnan(va) and math.isnan(vb) or va == vb:
                continue
            exact = False
            gap = abs(va - vb)
            d.max_abs = max(d.max_abs, gap)
            d.max_rel = max(d.max_rel, gap / max(abs(va), abs(vb), 1e-300))
            if not gap <= atol + rtol * abs(va):
                first = first or f"step {step} (epoch {a.get('epoch')}): {key} {va!r} vs {vb!r}"
    verdict = "identical" if exact else ("differs" if first else "within tolerance")
    return Comparison(verdict, sorted(diffs.values(), key=lambda d: d.key), first)


def environment_differences(original: dict, rerun: dict) -> list[str]:
    """What differs between the two runs' provenance that can change results."""
    out = []
    batch_a, batch_b = batch_record(original) or {}, batch_record(rerun) or {}
    members = int(batch_a.get("members", 1))
    # Members whose masks came from one stream they shared (vmap's, or any batch of an earlier
    # version, recorded as `vectorized`) are reproduced only by their batch; the others alone too.
    shared = "vectorized" in original or batch_a.get("shared_stream", False)
    if members > 1 and shared and (batch_b.get("members"), batch_b.get("index")) != (members, batch_a.get("index")):
        out.append(f"batched: the original trained as member {batch_a.get('index')} of a batch of "
                   f"{members}, whose members drew their dropout masks from one shared stream; alone, a run "
                   "draws its own (rerun the sweep directory, which trains the batch again, to reproduce it)")
    versions_a, versions_b = original.get("versions", {}), rerun.get("versions", {})
    for name in sorted(set(versions_a) | set(versions_b)):
        if versions_a.get(name) != versions_b.get(name):
            out.append(f"{name} {versions_a.get(name)} -> {versions_b.get(name)}")
    if original.get("device") != rerun.get("device"):
        out.append(f"device {original.get('device')} -> {rerun.get('device')}")
    git_a, git_b = original.get("git", {}), rerun.get("git", {})
    if git_a.get("commit") != git_b.get("commit"):
        out.append(f"code: git commit {str(git_a.get('commit'))[:10]} -> {str(git_b.get('commit'))[:10]}")
    for label, git in (("original", git_a), ("rerun", git_b)):
        if git.get("dirty"):
            out.append(f"the {label} ran from a tree with uncommitted changes")
    if original.get("data_sha256") and original.get("data_sha256") != rerun.get("data_sha256"):
        out.append("the data differs (data_sha256)")
    return out


def likely_cause(comparison: Comparison, overrides: list[str], env: list[str], deterministic: bool) -> str | None:
    if comparison.reproduces:
        return None
    if overrides:
        return f"the overrides given to rerun ({' '.join(overrides)})"
    for needle, cause in (
        ("batched:", "the original was a member of a batch whose dropout masks came from one shared "
                     "stream; rerun the sweep directory to reproduce it"),
        ("the data differs", "the data changed"),
        ("code:", "the code changed between the runs"),
        ("uncommitted", "uncommitted changes to the code"),
        ("torch ", "a different torch version"),
        ("device ", "a different device (kernels differ between devices)"),
        ("cuda ", "a different CUDA version"),
        ("cudnn ", "a different cuDNN version"),
    ):
        if any(item.startswith(needle) or needle in item for item in env):
            return cause
    if not deterministic:
        return "deterministic=false: nondeterministic kernels were allowed"
    return None


class MembersError(Exception):
    """A study or sweep directory whose record does not say which runs it holds."""


def _record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MembersError(f"{path}: not readable JSON ({exc}); cannot tell which runs to rerun.") from None
    if not isinstance(record, dict):
        raise MembersError(f"{path}: not a study or sweep record; cannot tell which runs to rerun.")
    return record


def _name_in(run_dir: Any, base: Path) -> str:
    """A member's path relative to its study or sweep, as the record wrote it (relative to where
    the command ran, or absolute); a record written elsewhere falls back to the last part."""
    path = Path(str(run_dir or ""))
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.name


def members_of(directory: Path) -> list[tuple[str, Path]] | None:
    """The runs of a study (its arms, from study.json) or of a sweep (its jobs, from sweep.json,
    else the numbered job directories beside Hydra's multirun.yaml), each named by its path
    relative to `directory`; None when `directory` is neither, i.e. a single run."""
    if (directory / "sweep.json").is_file():
        record = _record(directory / "sweep.json")
        base = Path(str(record.get("sweep_dir") or directory))
        names = [_name_in(job.get("run_dir"), base) for job in record.get("jobs") or [] if isinstance(job, dict)]
        source = directory / "sweep.json"
    elif (directory / "multirun.yaml").is_file():
        names = sorted((p.name for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), key=int)
        source = directory / "multirun.yaml"
    elif (directory / "study.json").is_file():
        record = _record(directory / "study.json")
        names = [Path(str(arm.get("run_dir") or "")).name for arm in record.get("arms") or [] if isinstance(arm, dict)]
        source = directory / "study.json"
    else:
        return None
    if not names:
        raise MembersError(f"{source}: lists no runs; there is nothing to rerun.")
    for name in names:
        # The new directory mirrors these names, so none may point outside it.
        if name in ("", ".") or Path(name).is_absolute() or ".." in Path(name).parts:
            raise MembersError(f"{source}: a run's directory ({name!r}) is not inside {directory}.")
    if len(set(names)) != len(names):
        raise MembersError(f"{source}: lists the same run directory twice.")
    return [(name, directory / name) for name in names]
