"""What the benchmark scripts share: how they name the machine they ran on and what its CPU has,
its load, and how a row joins its table in BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_bf16_flags() -> list[str]:
    """The CPU's native bf16 instructions (avx512_bf16, amx_bf16) as /proc/cpuinfo lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return [f for f in ("avx512_bf16", "amx_bf16") if f in line.split()]
    except OSError:
        pass
    return []


def load_average() -> str:
    try:
        return "{:.1f}".format(os.getloadavg()[0])
    except OSError:
        return "?"


def add_row(heading: str, table: str, row: str) -> None:
    """`row` joins the table under `heading` in BENCHMARKS.md; the section and table are made if missing."""
    path = BENCHMARKS
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if heading not in text:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n" + table + row
    else:
        # The row goes right after the last row of this section's table (prose may follow it;
        # the next heading starts another section).
        start = text.index(heading)
        end = text.find("\n## ", start + len(heading))
        end = len(text) if end < 0 else end
        lines = text[start:end].split("\n")
        last = max((i for i, line in enumerate(lines) if line.startswith("|")), default=None)
        if last is None:
            lines[1:1] = ["", table.rstrip("\n"), row.rstrip("\n")]
        else:
            lines.insert(last + 1, row.rstrip("\n"))
        text = text[:start] + "\n".join(lines) + text[end:]
    path.write_text(text)


def print_result(result: dict, json_path: Path | None) -> None:
    """The result as JSON on stdout, and in `json_path` when one was given."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        json_path.write_text(text + "\n")
