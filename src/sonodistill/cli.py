"""`sonodistill` command line: a thin dispatcher over the Python API.

Each subcommand lives beside the code it drives and exposes `main(argv) -> int`; modules are
imported lazily so that `sonodistill --help` answers without importing torch.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "distill": ("sonodistill.distill.cli", "distil a DINOv3 teacher into a CNN student"),
    "corpus": ("sonodistill.data.cli", "build, check and pack an unlabeled ultrasound corpus"),
    "evaluate": ("sonodistill.evaluate.cli", "downstream segmentation/classification suites"),
    "embed": ("sonodistill.evaluate.embed", "embeddings of a corpus or dataset with any encoder"),
    "analyze": ("sonodistill.evaluate.analyze", "t-SNE/UMAP, silhouette and k-NN of embeddings"),
    "export": ("sonodistill.deploy.export", "ONNX (fp32, int8) export checked against PyTorch"),
    "bench": ("sonodistill.deploy.bench", "teacher vs student cost table (paper Table 5)"),
    "demo": ("sonodistill.demo", "the whole method on an embedded simulated corpus"),
    "report": ("sonodistill.report", "a self-contained HTML report of a run folder"),
}


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
        print(f"sonodistill: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    from sonodistill.models.weights import WeightsMismatchError

    try:
        return int(module.main(argv[1:]) or 0)
    except (FileNotFoundError, WeightsMismatchError) as err:
        # Bad input is the user's to fix: say what and where, without a traceback.
        if os.environ.get("SONODISTILL_DEBUG"):
            raise
        print(f"sonodistill {argv[0]}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
