"""Comparing a rerun with its original: every metric at every logged step, and the
environment each ran in, ending in a verdict (identical, within tolerance, differs); and
rerunning a whole study or sweep, member by member, with one verdict per member and overall."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dropstudy.engine.batching import why_not
from dropstudy.runs.compare import Comparison, compare_metrics, environment_differences, likely_cause
from dropstudy.runs.execute import Batch, train_members, train_run
from dropstudy.runs.execute import Member as ExecMember
from dropstudy.store.rundir import RunDir, batch_record, write_json_atomic


@dataclass
class Member:
    """One run of a study or sweep, as a directory rerun plans it: `cfg` is None when the
    original did not finish (it is skipped, as there is nothing whole to compare with)."""

    name: str  # relative to the study or sweep; the rerun's member directory has the same name
    original: Path
    status: str  # the original's
    cfg: Any = None  # its saved config, with the rerun's overrides
    overrides: list[str] = field(default_factory=list)  # saved ones, then the rerun's


@dataclass
class MemberRerun:
    member: Member
    new_dir: Path
    status: str  # the rerun's
    comparison: Comparison
    environment: list[str]
    likely_cause: str | None
    result: Any = None  # execute.RunResult


@dataclass
class DirectoryRerun:
    original: Path
    new_dir: Path
    done: list[MemberRerun] = field(default_factory=list)
    skipped: list[Member] = field(default_factory=list)
    interrupted: bool = False

    @property
    def verdict(self) -> str:
        """The worst of the members': differs, else within tolerance, else identical."""
        verdicts = {m.comparison.verdict for m in self.done}
        return next((v for v in ("differs", "within tolerance") if v in verdicts), "identical")

    @property
    def first_differing(self) -> MemberRerun | None:
        return next((m for m in self.done if not m.comparison.reproduces), None)

    @property
    def environment(self) -> list[str]:
        seen: dict[str, None] = {}
        for m in self.done:
            seen.update(dict.fromkeys(m.environment))
        return list(seen)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 0 if self.verdict != "differs" else 1

    def record(self, overrides: list[str], rtol: float, atol: float) -> dict:
        first = self.first_differing
        return {
            "original": str(self.original), "overrides": overrides, "rtol": rtol, "atol": atol,
            "verdict": self.verdict,
            "first_difference": f"{first.member.name}: {first.comparison.first_difference}" if first else None,
            "environment_differences": self.environment,
            "interrupted": self.interrupted,
            "skipped": [{"name": m.name, "original": str(m.original), "status": m.status} for m in self.skipped],
            "members": [
                {"name": m.member.name, "original": str(m.member.original), "new_dir": str(m.new_dir),
                 "status": m.status, "verdict": m.comparison.verdict,
                 "first_difference": m.comparison.first_difference, "likely_cause": m.likely_cause,
                 "environment_differences": m.environment, "metrics": [vars(d) for d in m.comparison.metrics]}
                for m in self.done
            ],
        }


def _batch_of(member: Member) -> tuple | None:
    """The batch the original trained in (its number and members), from its provenance;
    None when it trained on its own."""

    batch = batch_record(RunDir.existing(member.original).read_provenance())
    if batch is None or "run_dirs" not in batch:
        return None
    return batch["number"], tuple(batch["run_dirs"])


def rerun_members(
    original: Path, members: list[Member], new_dir: Path, overrides: list[str], rtol: float, atol: float,
    on_member: Callable[[MemberRerun], None] | None = None,
) -> DirectoryRerun:
    """Train every finished member again into `new_dir/<its name>`, compare each with its
    original, and keep `new_dir/rerun.json` up to date after each (so a crash still leaves the
    verdicts so far). A member that trained alone trains alone again, exactly as `dropstudy
    rerun RUN_DIR` trains one run; the members of a batched sweep train together again as
    one batch. Stops after an interruption."""

    out = DirectoryRerun(original, new_dir, skipped=[m for m in members if m.cfg is None])
    todo = [m for m in members if m.cfg is not None]
    batches = [_batch_of(m) for m in todo]
    done_batches: set = set()
    for member, batch in zip(todo, batches):
        if batch is not None and batch in done_batches:
            continue
        group = [m for m, b in zip(todo, batches) if b == batch] if batch is not None else [member]
        for m in group:
            RunDir(new_dir / m.name).write_config(m.cfg, m.overrides)
        done_batches.add(batch)
        results = train_batch(group, new_dir, batch) if batch is not None else None
        if results is None:
            results = []
            for m in group:
                before = RunDir(m.original)
                previous = before.read_summary().get("wandb", {}) if before.summary_path.is_file() else {}
                results.append(train_run(m.cfg, new_dir / m.name, m.overrides, group=previous.get("group"),
                                         job_type="rerun", extra_tags=("rerun",), starts_from=m.original))
                if results[-1].status == "interrupted":
                    break
        for m, result in zip(group, results):
            before, after = RunDir(m.original), RunDir(new_dir / m.name)
            comparison = compare_metrics(before.read_metrics(), after.read_metrics(), rtol, atol)
            env = environment_differences(before.read_provenance(), after.read_provenance())
            done = MemberRerun(m, new_dir / m.name, result.status, comparison, env,
                               likely_cause(comparison, overrides, env, bool(m.cfg.deterministic)), result)
            out.done.append(done)
            out.interrupted = out.interrupted or result.status == "interrupted"
            write_json_atomic(new_dir / "rerun.json", out.record(overrides, rtol, atol))
            if on_member is not None:
                on_member(done)
        if out.interrupted:
            break
    return out


def train_batch(group: list[Member], new_dir: Path, batch: tuple) -> list | None:
    """The members of one batch trained again as one batch (in the original's member
    order); None when the rerun's overrides made them unbatchable, so they train one by one."""

    if len(group) < 2 or why_not([m.cfg for m in group]) is not None:
        return None
    before = RunDir(group[0].original)
    wandb = before.read_summary().get("wandb", {}) if before.summary_path.is_file() else {}
    members = [ExecMember(cfg=m.cfg, run_dir=new_dir / m.name, overrides=m.overrides) for m in group]
    return train_members(members, Batch(group=wandb.get("group"), extra_tags=("rerun",), sweep=(batch[0], new_dir)))
