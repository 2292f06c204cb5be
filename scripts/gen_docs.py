"""The docs pages that are generated, never written by hand: the configuration reference (from the
schema's dataclasses in src/dropstudy/config/schema.py and the composed experiments), the CLI reference
(from the Typer app's help), and the full benchmark record (BENCHMARKS.md as it is).

It is an MkDocs hook (`hooks:` in mkdocs.yml): every `mkdocs build` or `mkdocs serve` renders the
pages from the current schema and app, so the site cannot show a stale reference. Run by hand it
writes the same pages to a directory, to read them without MkDocs:

    python scripts/gen_docs.py OUT_DIR        # OUT_DIR/reference/config.md, reference/cli.md, benchmarks.md
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import importlib
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any, Iterator

import click
import typer
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from dropstudy.cli import app
from dropstudy.config import schema
from dropstudy.config.compose import compose, conf_dir

ROOT = Path(__file__).resolve().parents[1]
CONFIG_PAGE = "reference/config.md"
CLI_PAGE = "reference/cli.md"
BENCHMARKS_PAGE = "benchmarks.md"
EXPERIMENTS = tuple(e.value for e in schema.Experiment)
# What conf/config.yaml composes when no experiment is named.
DEFAULT_EXPERIMENT = "regression"
SLURM_LAUNCHER = conf_dir() / "hydra" / "launcher" / "slurm.yaml"
# Help is rendered as plain text at a fixed width (what a code block shows without scrolling), so the
# page does not depend on the terminal.
HELP_WIDTH = 80


def sections() -> list[tuple[str, str, type, tuple[str, ...]]]:
    """The reference's sections: (heading, key prefix, dataclass, the experiments that use it)."""
    return [
        ("Top level", "", schema.Config, EXPERIMENTS),
        ("model: every model", "model.", schema.ModelConfig, EXPERIMENTS),
        ("model: the MLP (experiment=regression)", "model.", schema.MLPConfig, ("regression",)),
        ("model: the CNN (experiment=cifar10)", "model.", schema.CNNConfig, ("cifar10",)),
        ("data: regression", "data.", schema.RegressionDataConfig, ("regression",)),
        ("data: CIFAR-10", "data.", schema.Cifar10DataConfig, ("cifar10",)),
        ("optim", "optim.", schema.OptimConfig, EXPERIMENTS),
        ("trainer", "trainer.", schema.TrainerConfig, EXPERIMENTS),
        ("tracker", "tracker.", schema.TrackerConfig, EXPERIMENTS),
        ("eval", "eval.", schema.EvalConfig, EXPERIMENTS),
        ("study", "study.", schema.StudyConfig, EXPERIMENTS),
        ("sweep", "sweep.", schema.SweepConfig, EXPERIMENTS),
    ]


# What the reference says of the keys that config/schema.py declares without a comment above them
# (a comment added there replaces the entry here; tests/test_docs.py keeps the two apart).
FALLBACK = {
    "Config.experiment": "Which study: picks its model, data and optimiser (`conf/experiment/NAME.yaml`).",
    "Config.seed": "Seeds Python, NumPy and torch (CPU and CUDA); the batch order has its own generator seeded from it, "
            "and the data follow `data.seed`, which defaults to it.",
    "Config.deterministic": "PyTorch's deterministic algorithms (on CUDA also `CUBLAS_WORKSPACE_CONFIG` and cuDNN "
                     "benchmarking off): the same config and seed give bit-identical metrics on a CPU.",
    "Config.device": "`auto` = CUDA, else MPS, else CPU; or `cpu`, `cuda`, `cuda:N`, `mps`.",
    "ModelConfig.dropout_kind": "The formulation at every site: `inverted` (exactly `torch.nn.Dropout`), `vanilla` "
                          "(no rescaling in training, activations x (1 - p) in evaluation), `gaussian` (x N(1, "
                          "p/(1 - p)) noise), `spatial` (whole feature maps at the CNN's conv sites), `none` (no "
                          "dropout sites).",
    "MLPConfig.in_features": "Input width.",
    "MLPConfig.hidden": "The hidden layers' widths; a dropout site after each.",
    "CNNConfig.hidden": "The width of fc1 (512 -> hidden) and the input of fc2.",
    "ModelConfig.name": "Which network; the experiment picks it.",
    "Cifar10DataConfig.name": "Which data set; the experiment picks it.",
    "MLPConfig.out_features": "Output width.",
    "CNNConfig.channels": "Output channels of the three conv blocks.",
    "CNNConfig.num_classes": "Outputs of the last layer.",
    "RegressionDataConfig.n_points": "Training points (and validation and test points), x evenly spaced on [-1, 1].",
    "RegressionDataConfig.slope": "y = slope * x + noise.",
    "RegressionDataConfig.train_noise": "Standard deviation of the training targets' noise.",
    "RegressionDataConfig.test_noise": "Standard deviation of the validation and test targets' noise.",
    "Cifar10DataConfig.root": "Where CIFAR-10 lies: torchvision's `cifar-10-batches-py/`, or `train/<class>/` and "
                 "`test/<class>/` image folders; the decoded tensors are cached there. Default: "
                 "`$DROPSTUDY_DATA`, else `~/.cache/dropstudy`.",
    "Cifar10DataConfig.download": "Fetch CIFAR-10 with torchvision when it is missing.",
    "Cifar10DataConfig.subset": "null = every training image; N = N images drawn with `data.seed`, stratified by class.",
    "Cifar10DataConfig.synthetic": "CIFAR-shaped random images (smoke tests, benchmarks), labelled SYNTHETIC in the logs, "
                      "the summary, the W&B config and tags.",
    "Cifar10DataConfig.val_size": "Training images held out for validation, drawn with `data.seed`.",
    "Cifar10DataConfig.seed": "Seeds the validation split, the subset and synthetic images apart from the model.",
    "OptimConfig.name": "The optimizer.",
    "OptimConfig.lr": "Learning rate.",
    "OptimConfig.momentum": "SGD's momentum.",
    "OptimConfig.weight_decay": "The optimizer's L2 weight decay.",
    "TrainerConfig.epochs": "Training length; for the regression study one epoch is one full-batch step.",
    "TrackerConfig.mode": "`auto` = online when W&B credentials exist (`WANDB_API_KEY`, or `wandb login`), else "
                    "offline; `WANDB_MODE` wins over `auto`; `disabled` writes no W&B files.",
    "TrackerConfig.project": "W&B project.",
    "TrackerConfig.entity": "W&B entity (user or team); null = W&B's default.",
    "TrackerConfig.group": "W&B group; null = the study's or sweep's own group.",
    "TrackerConfig.job_type": "W&B job type; null = dropstudy's (`dropout-<p>` for a study's arms and a sweep's jobs).",
    "TrackerConfig.tags": "Extra W&B tags.",
    "TrackerConfig.watch": "Which histograms to log: `gradients/<param>`, `parameters/<param>`, both, or none.",
    "StudyConfig.arms": "The dropout values `dropstudy study` trains, one arm each (one p, or a per-site list).",
}

CONFIG_INTRO = """\
# Configuration reference

*Generated from the schema (the dataclasses in `src/dropstudy/config/schema.py`) by `scripts/gen_docs.py`
each time the docs are built: do not edit by hand.*

Hydra composes `conf/config.yaml` with one group per concern (`model/`, `data/`, `optim/`,
`experiment/`); an experiment overlay picks a study's model, data and optimiser and overrides
only what differs. Every key, with its type and default, is declared once in the schema (the
YAML groups set only what differs from it; choice keys are enums), so a wrong key, choice, type
or range stops before anything runs, with one message and exit code 2:

```
$ dropstudy train model.dropout=1.0
error: model.dropout=1.0: the probability of dropping a unit must be in [0, 1) (0 = no dropout; 1 would drop every unit).
```

Set any key on the command line as a Hydra override (`trainer.epochs=5`, `tracker.tags=[a,b]`);
`dropstudy train --cfg [OVERRIDES]` prints the composed config without running. **default** is
the schema's value; **experiment sets** is what `experiment=regression` or `experiment=cifar10`
composes where it differs (the default experiment is `regression`). `p` is always the
probability of dropping a unit (PyTorch's convention). Hydra's own keys (`hydra.run.dir`,
`hydra.sweep.dir`, launchers, sweepers) are described under [Sweeps and clusters](../sweeps.md).
"""


# --------------------------------------------------------------------------- configuration


def field_comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment lines right above that field in config/schema.py, joined."""
    source = Path(inspect.getsourcefile(schema)).read_text()
    lines = source.splitlines()
    comments: dict[tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                above = []
                i = stmt.lineno - 2
                while i >= 0 and lines[i].strip().startswith("#"):
                    above.insert(0, lines[i].strip().lstrip("#").strip())
                    i -= 1
                comments[(node.name, stmt.target.id)] = " ".join(above)
    return comments


def declaring_class(cls: type, name: str) -> type:
    """The class in cls's MRO whose own body declares field `name`."""
    for klass in cls.__mro__:
        if name in klass.__dict__.get("__annotations__", {}):
            return klass
    return cls


def type_text(annotation: Any) -> str:
    """A field's type as a reader writes it: int, float, list[int], int or null, one of a, b."""
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(f"`{m.value}`" for m in annotation)
    if annotation is Any:
        return "any"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(type_text(a) for a in inner) + " or null"
    if origin in (list, typing.List):
        return f"list[{type_text(args[0]) if args else 'any'}]"
    return getattr(annotation, "__name__", str(annotation))


def schema_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING


def value_text(value: Any) -> str:
    if value is MISSING or value == "???":
        return "(set by the experiment)"
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    return f"`{value}`"


def composed_configs() -> dict[str, DictConfig]:
    """Each experiment's composed config (read unresolved, so `${seed}` reads as written)."""
    return {name: compose([f"experiment={name}"], resolve=False) for name in EXPERIMENTS}


def unresolved(cfg: DictConfig, key: str) -> Any:
    node: Any = OmegaConf.to_container(cfg, resolve=False)
    for part in key.split("."):
        node = node[part]
    return node


def own_doc(cls: type) -> str:
    """A class's docstring, unless it is the signature dataclasses writes in its place."""
    doc = cls.__doc__ or ""
    return "" if doc.startswith(cls.__name__ + "(") else inspect.cleandoc(doc)


def schema_rows(cls: type, prefix: str, experiments: tuple[str, ...], composed: dict[str, DictConfig],
                comments: dict[tuple[str, str], str]) -> Iterator[tuple[str, str, str, str, str]]:
    """(key, type, default, experiment sets, what it is) for each leaf key of `cls`, nested
    dataclasses expanded; the top level's groups and a model's inherited keys have their own section."""
    hints = typing.get_type_hints(cls, vars(schema))
    for f in dataclasses.fields(cls):
        owner = declaring_class(cls, f.name)
        if cls in (schema.MLPConfig, schema.CNNConfig) and owner is schema.ModelConfig and f.name != "name":
            continue
        key = prefix + f.name
        default = schema_default(f)
        if cls is schema.Config and (dataclasses.is_dataclass(default) or f.name in ("model", "data")):
            continue
        if dataclasses.is_dataclass(default):
            yield from schema_rows(type(default), key + ".", experiments, composed, comments)
            continue
        sets = []
        for name in experiments:
            value = unresolved(composed[name], key)
            if value_text(value) != value_text(default):
                sets.append(f"{name}: {value_text(value)}")
        if default is MISSING:
            default_text = f"{value_text(unresolved(composed[DEFAULT_EXPERIMENT], key))} (conf/config.yaml)"
        else:
            default_text = value_text(default)
        what = comments.get((owner.__name__, f.name)) or FALLBACK.get(f"{owner.__name__}.{f.name}", "")
        yield key, type_text(hints[f.name]), default_text, "; ".join(sets), what


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_config_reference() -> str:
    composed = composed_configs()
    comments = field_comments()
    out = [CONFIG_INTRO]
    for heading, prefix, cls, experiments in sections():
        out += [f"## {heading}", ""]
        if own_doc(cls):
            out += [own_doc(cls), ""]
        out += ["| key | type | default | experiment sets | what it is |", "| --- | --- | --- | --- | --- |"]
        for key, kind, default, sets, what in schema_rows(cls, prefix, experiments, composed, comments):
            out.append(f"| `{key}` | {cell(kind)} | {cell(default)} | {cell(sets)} | {cell(what)} |")
        out.append("")
    out += render_launcher_reference()
    return "\n".join(out)


def launcher_rows() -> Iterator[tuple[str, str, str]]:
    """(key, default, comment) for each key conf/hydra/launcher/slurm.yaml sets, its comment being
    the one on its line or the comment lines right above it."""
    lines = SLURM_LAUNCHER.read_text().splitlines()
    values = OmegaConf.load(SLURM_LAUNCHER)
    above: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        key, sep, rest = line.partition(":")
        if sep and not line.startswith((" ", "-")) and key in values and key != "defaults":
            trailing = rest.partition("#")[2].strip()
            yield key, value_text(values[key]), trailing or " ".join(above)
        above = []


def render_launcher_reference() -> list[str]:
    out = ["## hydra/launcher=slurm", "",
           "`dropstudy sweep hydra/launcher=slurm` submits the sweep as a SLURM job array through "
           "hydra-submitit-launcher (`pip install 'dropstudy[cluster]'`), with these defaults from "
           "`conf/hydra/launcher/slurm.yaml`. Set any with `hydra.launcher.KEY=VALUE`; submitit_slurm's other "
           "keys (`qos`, `account`, `constraint`, `gres`, `setup`, `additional_parameters`, ...) are there too, "
           "with submitit's defaults. See [Sweeps and clusters](../sweeps.md#slurm).", "",
           "| key | default | what it is |", "| --- | --- | --- |"]
    for key, default, what in launcher_rows():
        out.append(f"| `hydra.launcher.{key}` | {cell(default)} | {cell(what)} |")
    out.append("")
    return out


def schema_keys(composed: dict[str, DictConfig] | None = None) -> set[str]:
    """Every leaf key of the composed experiments, dotted (what the reference must list)."""
    composed = composed or composed_configs()
    keys: set[str] = set()

    def walk(node: DictConfig, prefix: str) -> None:
        for k in node.keys():
            child = node._get_node(k)
            if isinstance(child, DictConfig):
                walk(child, f"{prefix}{k}.")
            else:
                keys.add(f"{prefix}{k}")

    for cfg in composed.values():
        walk(cfg, "")
    return keys


# --------------------------------------------------------------------------- command line


def command_help(command: click.Command, name: str, parent: click.Context | None) -> tuple[str, click.Context]:
    """The plain-text help `dropstudy ... --help` prints (without rich's boxes and colours)."""
    command.rich_markup_mode = None
    ctx = click.Context(command, info_name=name, parent=parent, terminal_width=HELP_WIDTH,
                        max_content_width=HELP_WIDTH)
    return command.get_help(ctx), ctx


def cli_commands() -> dict[str, click.Command]:
    """The commands registered on the Typer app, in the order `--help` lists them."""
    root = typer.main.get_command(app)
    return dict(root.commands)


def render_cli_reference() -> str:
    root = typer.main.get_command(app)
    root_help, root_ctx = command_help(root, "dropstudy", None)
    out = [
        "# Command-line reference",
        "",
        "*Generated from the Typer app (`dropstudy.cli.app`) by `scripts/gen_docs.py` each time the docs "
        "are built: do not edit by hand. It is what `dropstudy --help` and `dropstudy COMMAND --help` "
        "print.*",
        "",
        "`python -m dropstudy` is the same command line. Every command that trains takes Hydra "
        "overrides: the keys are in the [configuration reference](config.md).",
        "",
        "## dropstudy",
        "",
        "```text",
        root_help.rstrip(),
        "```",
        "",
    ]
    for name, command in root.commands.items():
        text, _ = command_help(command, name, root_ctx)
        out += [f"## dropstudy {name}", "", command.get_short_help_str(limit=HELP_WIDTH), "", "```text",
                text.rstrip(), "```", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- pages


def render_benchmarks() -> str:
    return (ROOT / "BENCHMARKS.md").read_text()


def generated_pages() -> dict[str, str]:
    """Page path under docs/ -> its Markdown."""
    return {
        CONFIG_PAGE: render_config_reference(),
        CLI_PAGE: render_cli_reference(),
        BENCHMARKS_PAGE: render_benchmarks(),
    }


# A page may show a section of the README where it says <!-- include: README.md#<section slug> -->,
# so that the README's results have one source.
INCLUDE = re.compile(r"<!-- include: README\.md#([\w-]+) -->")


def readme_section(slug: str) -> str:
    """The body of the README's `## ` section whose heading slugs to `slug`, its links made relative
    to docs/ (docs/x.png -> x.png, BENCHMARKS.md -> benchmarks.md)."""
    text = (ROOT / "README.md").read_text()
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    for heading, body in zip(parts[1::2], parts[2::2]):
        if re.sub(r"[^\w]+", "-", heading.strip().lower()).strip("-") == slug:
            body = body.replace("](docs/", "](").replace("](BENCHMARKS.md", "](benchmarks.md")
            return body.strip() + "\n"
    raise KeyError(f"README.md has no section '## ...' that slugs to {slug!r}")


def on_page_markdown(markdown, page, config, files):  # noqa: ANN001 (the MkDocs hook's signature)
    """MkDocs hook: fill in the README sections a page includes."""
    return INCLUDE.sub(lambda m: readme_section(m.group(1)), markdown)


def reload_code() -> None:
    """Import the schema and the CLI afresh, so that `mkdocs serve` shows them as edited since it started."""
    global schema, app
    schema = importlib.reload(schema)
    app = importlib.reload(sys.modules["dropstudy.cli"]).app


def on_files(files, config):  # noqa: ANN001 (the MkDocs hook's signature)
    """MkDocs hook: add the generated pages (replacing any copy of them lying in docs/)."""
    from mkdocs.structure.files import File

    reload_code()
    for path, text in generated_pages().items():
        stale = files.get_file_from_path(path)
        if stale is not None:
            files.remove(stale)
        files.append(File.generated(config, path, content=text))
    return files


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    out = Path(argv[0])
    for path, text in generated_pages().items():
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
