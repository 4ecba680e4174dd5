"""`sonodistill` command line: a thin dispatcher over the Python API.

Every command is a `Command` record in `COMMANDS`: its typed config (a dataclass in a light
module of the package whose code it drives: no torch at import) and the function that runs it,
named as `"module:attribute"` strings and imported only when needed. So `sonodistill CMD --help`
builds the parser from the config alone and answers without importing torch, and a command
imports only what it runs. Commands of two words (`corpus build`) are registered as such;
`sonodistill corpus` lists them.

    COMMANDS.register("predict", Command(
        "a fine-tuned model over images and cines",
        config="sonodistill.deploy.config:PredictConfig",
        run="sonodistill.deploy.cli:predict"))                 # run(cfg) -> exit code

(Commands not converted yet are `Command(help, run="module:function")` without a config: the
function takes argv and parses itself.)

`--import MODULE` (anywhere, repeatable) imports a plugin module on the first registry lookup,
in this process and the processes it starts (`sonodistill.registry`); `sonodistill registry`
shows every registry's names and where they come from.

One error policy for every command (`sonodistill.errors`): a user error (bad option, missing,
corrupt or mismatched file, full disk, folder in use) is one line on stderr and exit code 2;
a run stopped by a signal says where its state is and exits with the scheduler's code; a bug
keeps its traceback. SONODISTILL_DEBUG=1 shows the traceback of user errors too. Renamed
options print one deprecation line each after the command (`config.deprecation_lines`).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass, field

from sonodistill.registry import Registry, add_imports


@dataclass(frozen=True)
class Command:
    """One `sonodistill` command."""

    help: str
    """One line for `sonodistill --help`."""
    run: str
    """`module:function`: run(cfg) -> exit code (heavy imports inside); without `config`, the
    old form run(argv) -> exit code."""
    config: str | None = None
    """`module:Class`, the command's config dataclass in a light module (its flags)."""
    positional: dict[str, str] = field(default_factory=dict)
    """Config fields given as positional arguments: {field: help}, in order."""
    parse: str | None = None
    """`module:function`, a custom parse(argv, prog) -> cfg (e.g. settings layered from a file)."""


COMMANDS: Registry[Command] = Registry("command", key="commands")
"""`sonodistill` commands by name (`corpus build`: two words)."""
for _name, _command in {
    "corpus build": Command(
        "SOURCES.yaml --out DIR: videos, volumes, DICOM, images -> a clean frame corpus",
        config="sonodistill.data.config:BuildConfig",
        run="sonodistill.data.cli:build",
        positional={"sources": "SOURCES.yaml"},
        parse="sonodistill.data.cli:parse_build",
    ),
    "corpus check-leakage": Command(
        "CORPUS --against+ NAME=PATH ...: exact/near duplicates with evaluation sets",
        config="sonodistill.data.config:LeakageConfig",
        run="sonodistill.data.cli:check_leakage",
        positional={"corpus": "corpus folder, its manifest.parquet, or an image folder"},
    ),
    "corpus pack": Command(
        "CORPUS --out DIR --image_size N: kept frames as a memory-mapped uint8 array",
        config="sonodistill.data.config:PackConfig",
        run="sonodistill.data.cli:pack",
        positional={"corpus": "corpus folder (or its manifest.parquet)"},
    ),
    "corpus summary": Command(
        "CORPUS: counts per dataset, kind and drop reason",
        config="sonodistill.data.config:SummaryConfig",
        run="sonodistill.data.cli:summary",
        positional={"corpus": "corpus folder (or its manifest.parquet)"},
    ),
    "distill": Command(
        "distil a DINOv3 teacher into a CNN",
        config="sonodistill.distill.config:DistillConfig",
        run="sonodistill.distill.cli:distill",
    ),
    "evaluate": Command(
        "downstream seg/cls suites",
        "sonodistill.evaluate.cli:evaluate",
        config="sonodistill.evaluate.config:SuiteConfig",
        parse="sonodistill.evaluate.cli:parse_evaluate",
    ),
    "evaluate audit": Command(
        "audit a suite's splits (groups, near duplicates) without training",
        "sonodistill.evaluate.cli:audit",
        config="sonodistill.evaluate.config:SuiteConfig",
        parse="sonodistill.evaluate.cli:parse_audit",
    ),
    "embed": Command(
        "embeddings of frames with any encoder",
        "sonodistill.evaluate.cli:embed",
        config="sonodistill.evaluate.config:EmbedConfig",
    ),
    "analyze": Command(
        "t-SNE/UMAP, silhouette and k-NN",
        "sonodistill.evaluate.cli:analyze",
        config="sonodistill.evaluate.config:AnalyzeConfig",
    ),
    "export": Command(
        "ONNX, ExecuTorch, ... models checked against PyTorch",
        "sonodistill.deploy.cli:export",
        config="sonodistill.deploy.config:ExportConfig",
    ),
    "bench": Command(
        "teacher vs student cost (paper Table 5)",
        "sonodistill.deploy.cli:bench",
        config="sonodistill.deploy.config:BenchConfig",
    ),
    "predict": Command(
        "a fine-tuned model over images, cines",
        "sonodistill.deploy.cli:predict",
        config="sonodistill.deploy.config:PredictConfig",
    ),
    "app": Command(
        "a local web viewer: your model on a file",
        "sonodistill.deploy.cli:app",
        config="sonodistill.deploy.config:AppConfig",
    ),
    "demo": Command(
        "the whole method in a simulated world, with a teacher that knows it",
        "sonodistill.demo:main",
        config="sonodistill.demo:DemoConfig",
    ),
    "report": Command(
        "a self-contained HTML report of a run folder",
        "sonodistill.report:main",
        config="sonodistill.report:ReportConfig",
        positional={"run_dir": "a run folder (e.g. runs/demo)"},
    ),
    "registry": Command(
        "the registered names: families, losses, backends, ... (plugins too)",
        "sonodistill.cli:list_registered",
        config="sonodistill.cli:RegistryConfig",
        positional={"kind?": "which registry: families, commands, ... (default: all)"},
    ),
}.items():
    COMMANDS.register(_name, _command)

REGISTRIES = {
    "families": "sonodistill.models.specs:FAMILIES",
    "losses": "sonodistill.distill.config:LOSSES",
    "augmentations": "sonodistill.distill.config:AUGMENTATIONS",
    "backends": "sonodistill.deploy.runtimes:BACKENDS",
    "protocols": "sonodistill.evaluate.config:PROTOCOLS",
    "seg_decoders": "sonodistill.evaluate.config:SEG_DECODERS",
    "dataset_formats": "sonodistill.evaluate.config:DATASET_FORMATS",
    "commands": "sonodistill.cli:COMMANDS",
}
"""What `sonodistill registry` shows: registry key -> where the registry is declared."""


@dataclass
class RegistryConfig:
    """Print the names in sonodistill's registries, with their titles and where each is defined
    (plugins included: entry points of `sonodistill.plugins` and `--import MODULE`)."""

    kind: str = ""
    """Which registry (default: all)."""


def list_registered(cfg: RegistryConfig) -> int:
    from sonodistill.errors import unknown_name

    if cfg.kind and cfg.kind not in REGISTRIES:
        raise unknown_name("registry", cfg.kind, REGISTRIES, "kind")
    for key in [cfg.kind] if cfg.kind else list(REGISTRIES):
        registry = _load(REGISTRIES[key])
        print(f"{key} ({registry.kind}):")
        for entry in registry.list():
            title = getattr(entry.obj, "help", None) or entry.title
            print(f"  {entry.name:<18} {title:<48} {entry.origin}")
    return 0


def _usage(group: str = "") -> str:
    names = [n for n in COMMANDS.names() if not group or n.startswith(group + " ")]
    tops = dict.fromkeys(n if group else n.split()[0] for n in names)
    width = max(map(len, tops))

    def text(name: str) -> str:
        subs = [n for n in names if n.startswith(name + " ")]
        if name in COMMANDS:  # a command that also has sub-commands (evaluate, evaluate audit)
            return COMMANDS.get(name).help + "".join(f"; also `{n}`" for n in subs)
        return "commands: " + ", ".join(n.split(" ", 1)[1] for n in subs)

    rows = "\n".join(f"  {name:<{width}}  {text(name)}" for name in tops)
    prog = f"sonodistill {group}".strip()
    return (
        f"usage: {prog} COMMAND [options]   ({prog} COMMAND --help for its options;\n"
        "       --import MODULE loads a plugin)\n\n"
        f"commands:\n{rows}\n"
    )


def main(argv: list[str] | None = None) -> int:
    argv = _take_imports(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from sonodistill import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if rest and f"{name} {rest[0]}" in COMMANDS:
        name, rest = f"{name} {rest[0]}", rest[1:]
    elif name not in COMMANDS and any(n.startswith(name + " ") for n in COMMANDS.names()):
        group = [n.split(" ", 1)[1] for n in COMMANDS.names() if n.startswith(name + " ")]
        if not rest or rest[0] in ("-h", "--help"):
            print(_usage(name))
            return 0
        return _refuse("command", rest[0], group, f"sonodistill {name}")
    if name not in COMMANDS:
        tops = dict.fromkeys(n.split()[0] for n in COMMANDS.names())
        return _refuse("command", name, tops, "sonodistill")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_command(name, rest)


def _refuse(what: str, name: str, known, prog: str) -> int:
    from sonodistill.errors import USER_ERROR, unknown_name

    error = unknown_name(what, name, known, see=f"see {prog} --help")
    print(f"{prog}: error: {error}", file=sys.stderr)
    return USER_ERROR


def _take_imports(argv: list[str]) -> list[str]:
    """argv without its `--import MODULE` / `--import=MODULE` (added to the plugin imports)."""
    out, modules = [], []
    args = iter(argv)
    for arg in args:
        if arg == "--import":
            modules.append(next(args, ""))
        elif arg.startswith("--import="):
            modules.append(arg.split("=", 1)[1])
        else:
            out.append(arg)
    if modules:
        add_imports([m for m in modules if m])
    return out


def _load(target: str):
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def parse_command(name: str, argv: list[str]):
    """The config of `sonodistill NAME ARGV...` (help printed and SystemExit here, before
    anything heavy is imported)."""
    from sonodistill.config import parse_config

    command = COMMANDS.get(name)
    if command.parse:
        return _load(command.parse)(argv, f"sonodistill {name}")
    cls = _load(command.config)
    description = cls.__doc__ or command.help
    return parse_config(cls, argv, f"sonodistill {name}", description, command.positional)


def run_command(name: str, argv: list[str]) -> int:
    """`sonodistill NAME ARGV...` under the error policy; returns the exit code."""
    from sonodistill import config
    from sonodistill.errors import USER_ERROR, Interrupted, user_message

    debug = os.environ.get("SONODISTILL_DEBUG", "") not in ("", "0")
    config.reset_deprecations()
    command = COMMANDS.get(name)
    try:
        if command.config is None and command.parse is None:
            code = int(_load(command.run)(argv) or 0)  # the old form: it parses argv itself
        else:
            code = int(_load(command.run)(parse_command(name, argv)) or 0)
    except Interrupted as err:
        print(f"sonodistill {name}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"sonodistill {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        message = user_message(err)
        if message is None or debug:
            raise  # a bug: its traceback is the report
        print(f"sonodistill {name}: error: {config.as_typed(message)}", file=sys.stderr)
        return USER_ERROR
    for line in config.deprecation_lines(f"sonodistill {name}"):
        print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
