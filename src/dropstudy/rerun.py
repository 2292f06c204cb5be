"""Comparing a rerun with its original: every metric at every logged step, and the
environment each ran in, ending in a verdict (identical, within tolerance, differs)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

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
