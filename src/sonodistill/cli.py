"""`sonodistill` command line: a thin dispatcher over the Python API.

Every command is a function `NAME_main(argv) -> int` in the `cli.py` of the package whose code
it drives (data/cli.py: corpus; distill/cli.py: distill; evaluate/cli.py: evaluate, embed,
analyze; deploy/cli.py: export, bench, predict, app), or here for the commands above the
packages (demo, report); every one parses a typed config with jsonargparse (`--config`,
`--print_config`, `--section.field value`). Modules are imported lazily so that
`sonodistill --help` answers without importing torch.

One error policy for every command (`sonodistill.errors`): a user error (bad option, missing,
corrupt or mismatched file, full disk, folder in use) is one line on stderr and exit code 2;
a run stopped by a signal says where its state is and exits with the scheduler's code; a bug
keeps its traceback. SONODISTILL_DEBUG=1 shows the traceback of user errors too.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "corpus": ("sonodistill.data.cli:corpus_main", "build, check and pack an unlabeled corpus"),
    "distill": ("sonodistill.distill.cli:distill_main", "distil a DINOv3 teacher into a CNN"),
    "evaluate": ("sonodistill.evaluate.cli:evaluate_main", "downstream seg/cls suites"),
    "embed": ("sonodistill.evaluate.cli:embed_main", "embeddings of frames with any encoder"),
    "analyze": ("sonodistill.evaluate.cli:analyze_main", "t-SNE/UMAP, silhouette and k-NN"),
    "export": ("sonodistill.deploy.cli:export_main", "ONNX (fp32, int8) checked against PyTorch"),
    "bench": ("sonodistill.deploy.cli:bench_main", "teacher vs student cost (paper Table 5)"),
    "predict": ("sonodistill.deploy.cli:predict_main", "a fine-tuned head over images, cines"),
    "app": ("sonodistill.deploy.cli:app_main", "a local web viewer: your model on a file"),
    "demo": ("sonodistill.cli:demo_main", "the whole method on an embedded simulated corpus"),
    "report": ("sonodistill.cli:report_main", "a self-contained HTML report of a run folder"),
}


def demo_main(argv: list[str]) -> int:
    """Exit code 1 when a step failed (the others still run and the report is written)."""
    from sonodistill import demo
    from sonodistill.config import parse_config

    cfg = parse_config(demo.DemoConfig, argv, "sonodistill demo", demo.__doc__)
    run = demo.run_demo(cfg)
    summary = json.loads((run / "demo.json").read_text())
    failed = [s["name"] for s in summary["steps"] if s["status"] != "ok"]
    if failed:
        print(f"steps failed: {', '.join(failed)} (see the log above)")
    return 1 if failed else 0


def report_main(argv: list[str]) -> int:
    from sonodistill import report
    from sonodistill.config import parse_config

    positional = {"run_dir": "a run folder (e.g. runs/demo)"}
    cfg = parse_config(report.ReportConfig, argv, "sonodistill report", report.__doc__, positional)
    path = report.build_report(cfg.run_dir, cfg.out)
    print(f"report: {path}  (open it in a browser: file://{path.resolve()})")
    return 0


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
    return (
        "usage: sonodistill COMMAND [options]   (sonodistill COMMAND --help for its options)\n\n"
        f"commands:\n{rows}\n"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from sonodistill import __version__

        print(__version__)
        return 0
    if argv[0] not in COMMANDS:
        from sonodistill.errors import USER_ERROR, unknown_name

        error = unknown_name("command", argv[0], COMMANDS, see="see sonodistill --help")
        print(f"sonodistill: error: {error}", file=sys.stderr)
        return USER_ERROR
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_command(argv[0], argv[1:])


def run_command(name: str, argv: list[str]) -> int:
    """`sonodistill NAME ARGV...` under the error policy; returns the exit code."""
    from sonodistill.errors import USER_ERROR, Interrupted, user_message

    debug = os.environ.get("SONODISTILL_DEBUG", "") not in ("", "0")
    module, _, function = COMMANDS[name][0].partition(":")
    try:
        return int(getattr(importlib.import_module(module), function)(argv) or 0)
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
        print(f"sonodistill {name}: error: {message}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
