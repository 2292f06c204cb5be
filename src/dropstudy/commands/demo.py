"""`dropstudy demo NAME`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dropstudy.commands.common import fail


def demo(
    name: Optional[str] = typer.Argument(None, help="scaling, masks or equivalence", show_default=False),
    list_demos: bool = typer.Option(False, "--list", help="List the demonstrations and exit."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the figures [default: runs/demo/NAME]."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random draw: the same seed prints the same numbers."),
) -> None:
    """Small, deterministic demonstrations of dropout's mechanics, printed and plotted (no training).

    scaling: training vs evaluation output of a dropout layer, inverted and vanilla.
    masks: the masks drawn over a few steps, and the empirical drop rate vs p.
    equivalence: inverted and vanilla dropout give the same expected output.

    Examples:

        dropstudy demo --list

        dropstudy demo scaling

        dropstudy demo masks --seed 3

        dropstudy demo equivalence --out figures/
    """
    from dropstudy.report.demos import DEMOS

    if list_demos:
        for key, entry in DEMOS.items():
            typer.echo(f"{key:<12} {entry.summary}")
        raise typer.Exit()
    if name not in DEMOS:
        what = "name a demonstration" if name is None else f"no demonstration called {name!r}"
        raise fail(f"dropstudy demo: {what}; choose one of: {', '.join(DEMOS)} (see dropstudy demo --list).")
    result = DEMOS[name].run(out or Path("runs") / "demo" / name, seed)
    for line in result.lines:
        typer.echo(line)
    for path in result.figures:
        typer.echo(f"figure: {path}")
