"""Experiment tracking: the small interface the training loop talks to, and its W&B implementation.

The loop only ever calls `log`, `log_histograms`, `log_images`, `set_summary` and `finish`
(`report` also logs tables with `log_table`). `WandbTracker` maps those onto one W&B
run; `NullTracker` does nothing; `GuardedTracker` wraps a tracker so that a W&B failure
(network down, service refused, a bug in a hook) is reported once and then
ignored: training goes on, and the local metrics.jsonl/summary.json never depend on W&B.

`make_tracker` owns W&B's start-up: online, it says at once that it contacts the server and
waits at most `tracker.init_timeout` seconds; when online W&B cannot start, the run is logged
by offline W&B instead (so `wandb sync` uploads it later), and every later run of the same
process goes offline directly.

W&B's start costs seconds (its import, its service process, `wandb.init`), none of which
training needs, so none of it waits in line: `warm_up` imports W&B and starts its service in a
thread as soon as a command knows it will train, and `BackgroundTracker` runs a run's
`make_tracker` in a thread while the run sets up, holding the calls made meanwhile."""

from __future__ import annotations

import json
import logging
import netrc
import os
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlparse

from dropstudy.store.text import shell_path

if TYPE_CHECKING:  # torch is imported where a tensor is used: config checks and --help need none of it
    from torch import Tensor
from dropstudy.config.schema import TrackerConfig
from dropstudy.tracking.histograms import histograms
from dropstudy.tracking.tracker import NullTracker, Tracker, first_line, json_safe

log = logging.getLogger("dropstudy")


def has_wandb_credentials() -> bool:
    """An API key in the environment or a netrc entry for the W&B host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """`auto` is online with credentials, else offline; WANDB_MODE, when set, wins over auto."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if has_wandb_credentials() else "offline"


def patch_private(owner: Any, name: str, params: tuple[str, ...], wrap: Callable[[Callable], Callable]) -> bool:
    """Replace `owner.name`, a private function of another library, by `wrap(original)`, only
    while it has the shape the wrapper was written for: the name exists and its parameters are
    `params`. Otherwise nothing is patched (one debug line says why): an upgrade that changes
    the function then costs only the saving the patch made, never a failure inside the library.
    Wrappers take *args/**kwargs and hand them to the original unchanged. Idempotent."""
    where = f"{getattr(owner, '__name__', owner)}.{name}"
    original = getattr(owner, name, None)
    if original is None:
        log.debug("not patched: %s is missing in this version", where)
        return False
    if getattr(original, "dropstudy_patch", False):
        return True
    import inspect

    try:
        found = tuple(inspect.signature(original).parameters)
    except (TypeError, ValueError):
        found = None
    if found != params:
        log.debug("not patched: %s takes %s, written for %s", where, found, params)
        return False
    wrapper = wrap(original)
    wrapper.dropstudy_patch = True
    setattr(owner, name, wrapper)
    return True


def cache_installed_packages(wandb: Any) -> bool:
    """At every `wandb.init`, W&B lists the installed packages for the run's requirements.txt by
    reading every distribution's metadata: the same answer each time in one process. Runs that
    share a process (a study's arms, a sweep's members) read it once: wandb's `working_set`
    (looked up at each init) is replaced by a cached copy."""

    def wrap(original: Callable) -> Callable:
        cache: list[Any] = []

        def working_set(*args: Any, **kwargs: Any) -> Any:
            if args or kwargs:  # a call this cache was not written for
                return original(*args, **kwargs)
            if not cache:
                cache.extend(original())
            return list(cache)

        return working_set

    return patch_private(getattr(wandb, "util", None), "working_set", (), wrap)


# The module through which a W&B Launch job stages its inputs (skip_unstaged_launch_inputs).
LAUNCH_INPUTS_MODULE = "wandb.sdk.launch.inputs.internal"


def skip_unstaged_launch_inputs(wandb: Any) -> bool:
    """At the end of every `wandb.init`, W&B applies the inputs a W&B Launch job staged in this
    process, importing its Launch package to look for them: seconds of CPU a process, spent on
    the GIL beside training. Inputs can only have been staged through that package's module, so
    while it is not imported there are none and the look is skipped; once it is (a Launch job),
    W&B's own method runs as before."""
    run_class = getattr(getattr(getattr(wandb, "sdk", None), "wandb_run", None), "Run", None)

    def wrap(original: Callable) -> Callable:
        def detect_and_apply_job_inputs(*args: Any, **kwargs: Any) -> Any:
            if LAUNCH_INPUTS_MODULE in sys.modules:
                return original(*args, **kwargs)
            return None

        return detect_and_apply_job_inputs

    return patch_private(run_class, "_detect_and_apply_job_inputs", ("self",), wrap)


def lighten_wandb_init(wandb: Any) -> None:
    """What `wandb.init` repeats for nothing in this process, done once or skipped (both are
    idempotent): the installed packages listed once, Launch inputs looked for only where they
    can exist."""
    cache_installed_packages(wandb)
    skip_unstaged_launch_inputs(wandb)


# What each run's W&B summary keeps of a metric: every loss its lowest value, every accuracy its
# highest; a gap (validation − eval-mode training) has no better side, so its last value, the one
# summary.json's `final` and the report hold.
SUMMARIES = {
    **{f"{split}/{name}": summary for split in ("train", "train_eval", "val", "test", "val_mc", "test_mc")
       for name, summary in (("loss", "min"), ("acc", "max"))},
    "gap/loss": "last",
    "gap/acc": "last",
}


class WandbTracker:
    """One W&B run, its files inside the run directory."""

    def __init__(
        self,
        *,
        run_dir: Path,
        mode: str,
        project: str,
        entity: str | None,
        group: str | None,
        job_type: str | None,
        tags: list[str],
        name: str,
        config: dict[str, Any],
        resume_id: str | None = None,
        shared_process: bool = False,
        init_timeout: float = 30.0,
    ):
        import wandb

        lighten_wandb_init(wandb)
        self._wandb = wandb
        self.mode = mode
        self.run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            job_type=job_type,
            tags=tags,
            name=name,
            config=config,
            dir=str(run_dir),
            mode=mode,
            # A resumed run continues the same W&B run (offline: a second folder with the same
            # id, which `wandb sync` merges).
            id=resume_id,
            resume="allow" if resume_id else None,
            # Runs of a study are trained one after another in one process, each finishing the
            # one before; the members of a batched sweep are alive together (shared_process).
            reinit="create_new" if shared_process else "finish_previous",
            # init_timeout bounds the wait for the server; offline, wandb's own default stays.
            settings=wandb.Settings(silent=True, console="off",
                                    **({"init_timeout": init_timeout} if mode == "online" else {})),
        )
        self.run_id = self.run.id
        self.url = self.run.url if mode == "online" else None
        # The folder quoted for the shell, the glob left for it to expand (a resumed run has two).
        self.sync_command = (f"wandb sync {shlex.quote(shell_path(Path(run_dir) / 'wandb'))}/offline-run-*-{self.run_id}"
                             if mode == "offline" else None)
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")
        for name, summary in SUMMARIES.items():
            self.run.define_metric(name, step_metric="epoch", summary=summary)

    def log(self, row: dict[str, Any], step: int) -> None:
        self.run.log(row, step=step)

    def log_histograms(self, tensors: dict[str, Tensor], step: int) -> None:
        """Histograms (64 bins, as `watch` draws them, computed on the device in one pass),
        joined to the row logged next at `step`."""

        drawn = {key: self._wandb.Histogram(np_histogram=counts_edges)
                 for key, counts_edges in histograms(tensors).items()}
        self.run.log(drawn, step=step, commit=False)

    def log_images(self, images: dict[str, Path], epoch: int, step: int) -> None:
        row: dict[str, Any] = {key: self._wandb.Image(str(path)) for key, path in images.items()}
        row["epoch"] = epoch
        self.run.log(row, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self.run.log({key: self._wandb.Table(columns=columns, data=rows)}, step=step)

    def set_summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    # Artifacts: the lineage data -> run -> model. A failure here is said once and leaves the
    # run's metrics flowing (GuardedTracker would drop every later call).

    def use_dataset(self, name: str, metadata: dict[str, Any], reference: str | None = None) -> None:
        """The data as an input artifact: a small description (dataset.json, with the data's content
        hash) and, for data on disk, a reference to it, never a copy."""
        def use() -> None:
            artifact = self._wandb.Artifact(name, type="dataset", metadata=json_safe(metadata))
            with artifact.new_file("dataset.json") as handle:
                handle.write(json.dumps(json_safe(metadata), sort_keys=True, indent=1))
            if reference is not None:
                artifact.add_reference(reference, name="files", checksum=False)
            self._use(artifact)

        self._artifact("use_dataset", use)

    def use_model(self, name: str, path: Path, metadata: dict[str, Any]) -> None:
        """The checkpoint a run starts from (resume, rerun) as an input: the model artifact `name`
        with that file, which W&B matches by content to the version already logged under it."""
        def use() -> None:
            artifact = self._wandb.Artifact(name, type="model", metadata=json_safe(metadata))
            artifact.add_file(str(path), name=Path(path).name)
            self._use(artifact)

        self._artifact("use_model", use)

    def log_checkpoint(self, path: Path, metadata: dict[str, Any], aliases: list[str]) -> None:
        """The run's checkpoint as its output model artifact, `model-<run id>` (metadata: the run's
        config and final metrics)."""
        def log() -> None:
            artifact = self._wandb.Artifact(f"model-{self.run_id}", type="model", metadata=json_safe(metadata))
            artifact.add_file(str(path), name=Path(path).name)
            self.run.log_artifact(artifact, aliases=aliases)

        self._artifact("log_checkpoint", log)

    def _use(self, artifact: Any) -> None:
        if self.mode == "offline":
            # Offline, W&B's use_artifact refuses; the same record it writes online (log, then use
            # once committed) goes into the offline file for `wandb sync`.
            self.run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
        else:
            self.run.use_artifact(artifact)

    def _artifact(self, what: str, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception as exc:  # lineage is a nicety: the run and its metrics go on
            log.warning("W&B artifact not recorded (%s: %s: %s); the run goes on.", what, type(exc).__name__,
                        first_line(exc))

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


class GuardedTracker:
    """Pass calls through until the first failure; then warn once and drop the rest."""

    def __init__(self, inner: Tracker):
        self.inner = inner
        self.failed = False

    @property
    def run_id(self) -> str | None:
        return self.inner.run_id

    @property
    def url(self) -> str | None:
        return None if self.failed else self.inner.url

    @property
    def sync_command(self) -> str | None:
        return self.inner.sync_command

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self.failed:
            return
        try:
            getattr(self.inner, method)(*args, **kwargs)
        except Exception as exc:  # W&B must never stop training
            self.failed = True
            log.warning(
                "W&B failed in %s (%s: %s); training continues without it. Every metric is still in "
                "metrics.jsonl and summary.json.",
                method,
                type(exc).__name__,
                exc,
            )

    def log(self, row: dict[str, Any], step: int) -> None:
        self._call("log", row, step)

    def log_histograms(self, tensors: dict[str, Tensor], step: int) -> None:
        self._call("log_histograms", tensors, step)

    def log_images(self, images: dict[str, Path], epoch: int, step: int) -> None:
        self._call("log_images", images, epoch, step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self._call("log_table", key, columns, rows, step)

    def set_summary(self, values: dict[str, Any]) -> None:
        self._call("set_summary", values)

    def use_dataset(self, name: str, metadata: dict[str, Any], reference: str | None = None) -> None:
        self._call("use_dataset", name, metadata, reference)

    def use_model(self, name: str, path: Path, metadata: dict[str, Any]) -> None:
        self._call("use_model", name, path, metadata)

    def log_checkpoint(self, path: Path, metadata: dict[str, Any], aliases: list[str]) -> None:
        self._call("log_checkpoint", path, metadata, aliases)

    def finish(self, exit_code: int = 0) -> None:
        if self.failed:
            try:  # release W&B's resources quietly; its data is already incomplete
                self.inner.finish(exit_code=1)
            except Exception:
                pass
            return
        self._call("finish", exit_code=exit_code)


# The thread that imports W&B and starts its service ahead of the first run (warm_up).
_warm_up: threading.Thread | None = None


def warm_up(mode: str) -> None:
    """Import W&B, start its service and list the installed packages (each run's
    requirements.txt), in a background thread, unless `mode` resolves to disabled; the first
    run's `make_tracker` waits for it. Nothing here contacts the server."""
    global _warm_up
    if _warm_up is None and resolve_mode(mode) != "disabled":
        _warm_up = threading.Thread(target=_import_and_start_wandb, name="dropstudy-wandb-warm-up", daemon=True)
        _warm_up.start()


def _import_and_start_wandb() -> None:
    try:
        import wandb

        lighten_wandb_init(wandb)
        wandb.util.working_set()
        wandb.setup()
    except Exception:  # the run's own start meets the same failure and reports it (make_tracker)
        pass


def _wait_for_warm_up() -> None:
    if _warm_up is not None:
        _warm_up.join()


# Why online W&B failed to start in this process, once it has: the later runs of a study or a
# sweep go offline at once instead of each waiting tracker.init_timeout again.
_online_failed: str | None = None


def wandb_server() -> str:
    return os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"


def make_tracker(
    tracker_cfg: Any,
    *,
    run_dir: Path,
    group: str | None,
    job_type: str | None,
    tags: list[str],
    name: str,
    config: dict[str, Any],
    resume_id: str | None = None,
    shared_process: bool = False,
) -> GuardedTracker:
    global _online_failed

    mode = resolve_mode(tracker_cfg.mode)
    if mode == "disabled":
        return GuardedTracker(NullTracker())
    _wait_for_warm_up()
    # Configs saved before tracker.init_timeout existed (resume, rerun) take its default.
    timeout = tracker_cfg.get("init_timeout") or TrackerConfig.init_timeout

    def start(mode: str) -> Tracker:
        return WandbTracker(
            run_dir=run_dir,
            mode=mode,
            project=tracker_cfg.project,
            entity=tracker_cfg.entity,
            group=group,
            job_type=job_type,
            tags=tags,
            name=name,
            config=config,
            resume_id=resume_id,
            shared_process=shared_process,
            init_timeout=timeout,
        )

    if mode == "online" and _online_failed is None:
        log.info(f"W&B: connecting to {wandb_server()} (tracker.init_timeout={timeout:g}s) ...")
        try:
            return GuardedTracker(start("online"))
        except Exception as exc:  # a timeout, a refused connection, a bad key: all mean "go offline"
            _online_failed = f"{type(exc).__name__}: {first_line(exc)}"
            fallback = f"could not start online ({_online_failed})"
        mode = "offline"
    elif mode == "online":
        mode, fallback = "offline", None  # said once already, for the first run of this process
    else:
        fallback = None
    try:
        inner = start(mode)
    except Exception as exc:
        log.warning(
            "W&B could not start%s (%s: %s); training without it. Metrics go to metrics.jsonl as always.",
            " offline either" if fallback else "",
            type(exc).__name__,
            first_line(exc),
        )
        return GuardedTracker(NullTracker())
    if fallback:
        log.warning(f"W&B: {fallback}; logging offline instead (this process's later runs too). "
                    f"To upload later: {inner.sync_command}")
    return GuardedTracker(inner)


class BackgroundTracker:
    """A tracker whose start-up (`start`: a `make_tracker` call, W&B's import, service and
    `wandb.init` with every fallback) runs in a thread, so that W&B starts while the caller sets
    up data and model instead of before.

    Calls made while it starts are kept, in order (histogram tensors copied, since the model
    changes them), and delivered from the calling thread at the first call after it is up, or by
    `finish`, which waits for it: every metric still reaches W&B, in the order it was logged.
    The run's id, url and sync command wait for it too (a checkpoint names the run). `waited_s`:
    seconds the caller spent on W&B: waiting for its start, and in `finish`."""

    def __init__(self, start: Callable[[], Tracker]):
        self._tracker: Tracker | None = None
        self._held: list[tuple[str, tuple]] = []
        self.waited_s = 0.0
        self._thread = threading.Thread(target=self._start, args=(start,), name="dropstudy-wandb-start", daemon=True)
        self._thread.start()

    def _start(self, start: Callable[[], Tracker]) -> None:
        try:
            self._tracker = start()
        except Exception as exc:  # make_tracker falls back by itself; anything else must not stop training
            log.warning("W&B could not start (%s: %s); training without it. Metrics go to metrics.jsonl as always.",
                        type(exc).__name__, first_line(exc))
            self._tracker = GuardedTracker(NullTracker())

    def wait(self) -> Tracker:
        """The started tracker, once every held call has reached it."""
        if self._thread.is_alive():
            start = time.perf_counter()
            self._thread.join()
            self.waited_s += time.perf_counter() - start
        tracker = self._tracker
        assert tracker is not None
        while self._held:
            method, args = self._held.pop(0)
            getattr(tracker, method)(*args)
        return tracker

    def _deliver(self, method: str, *args: Any) -> None:
        if self._thread.is_alive():
            self._held.append((method, args))
        else:
            getattr(self.wait(), method)(*args)

    @property
    def run_id(self) -> str | None:
        return self.wait().run_id

    @property
    def url(self) -> str | None:
        return self.wait().url

    @property
    def sync_command(self) -> str | None:
        return self.wait().sync_command

    def log(self, row: dict[str, Any], step: int) -> None:
        self._deliver("log", dict(row), step)

    def log_histograms(self, tensors: dict[str, Tensor], step: int) -> None:
        if self._thread.is_alive():
            tensors = {key: tensor.detach().clone() for key, tensor in tensors.items()}
        self._deliver("log_histograms", tensors, step)

    def log_images(self, images: dict[str, Path], epoch: int, step: int) -> None:
        self._deliver("log_images", dict(images), epoch, step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self._deliver("log_table", key, columns, rows, step)

    def set_summary(self, values: dict[str, Any]) -> None:
        self._deliver("set_summary", dict(values))

    def use_dataset(self, name: str, metadata: dict[str, Any], reference: str | None = None) -> None:
        self._deliver("use_dataset", name, metadata, reference)

    def use_model(self, name: str, path: Path, metadata: dict[str, Any]) -> None:
        # Delivered now, not held: the file is read before training writes a newer checkpoint over it.
        self.wait().use_model(name, path, metadata)

    def log_checkpoint(self, path: Path, metadata: dict[str, Any], aliases: list[str]) -> None:
        self._deliver("log_checkpoint", path, metadata, aliases)

    def finish(self, exit_code: int = 0) -> None:
        tracker = self.wait()
        start = time.perf_counter()
        tracker.finish(exit_code=exit_code)
        self.waited_s += time.perf_counter() - start
