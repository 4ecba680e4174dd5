"""`sonodistill evaluate`, `sonodistill evaluate audit`, `sonodistill embed` and `sonodistill
analyze`: the command descriptions and parsers (light: their configs are in
`sonodistill.evaluate.config`) and the runners, which import the library functions of the same
name when they run."""

from __future__ import annotations

from pathlib import Path

from sonodistill.config import parse_config
from sonodistill.errors import unknown_name
from sonodistill.evaluate.config import SuiteConfig

EVALUATE = (
    "Downstream evaluation (paper Tables 2, 3, 4, 6, 7): encoders x tasks x protocols x label "
    "fractions x seeds. One JSON per run under OUT/runs (finished runs are skipped), tables "
    "under OUT/tables. Example: sonodistill evaluate --config suites/smoke_cpu. "
    "`sonodistill evaluate audit --config SUITE` audits the suite's splits without training."
)
AUDIT = (
    "Audit the splits of a suite's tasks (made if missing, as `sonodistill evaluate` would): "
    "counts and class balance per split, groups, near-duplicate pairs within and across splits "
    "at the chosen similarity and close pairs at a looser one, names sharing a patient-like "
    "prefix across splits, conflicting-label duplicates, non-binary masks and "
    "a contact sheet of the closest cross-split pairs, written to OUT/splits/TASK.audit.md|json "
    "and TASK.pairs.png. Exit code 1 when pairs or groups straddle splits."
)


def parse_evaluate(argv: list[str], prog: str) -> SuiteConfig:
    """The suite's options; a word where an option belongs is a misspelt `audit`."""
    if argv and not argv[0].startswith("-"):
        raise unknown_name("command", argv[0], ["audit"], see="see sonodistill evaluate --help")
    return parse_config(SuiteConfig, argv, prog, EVALUATE)


def parse_audit(argv: list[str], prog: str) -> SuiteConfig:
    return parse_config(SuiteConfig, argv, prog, AUDIT)


def evaluate(cfg: SuiteConfig) -> int:
    """Run the suite (or, with --dry_run, print its estimate); prints the table files."""
    if cfg.dry_run:
        from sonodistill.evaluate.estimate import dry_run

        print(dry_run(cfg))
        return 0
    from sonodistill.evaluate.suite import run_suite

    for path in run_suite(cfg):
        print(path)
    return 0


def audit(cfg: SuiteConfig) -> int:
    """Exit code 1 when pairs or groups straddle the splits (the reports are written)."""
    from sonodistill.evaluate.audit import LeakError
    from sonodistill.evaluate.suite import run_audit

    try:
        reports = run_audit(cfg)
    except LeakError as err:
        print(f"sonodistill evaluate audit: {err}")
        return 1
    for r in reports:
        print(Path(cfg.out) / "splits" / f"{r['task']}.audit.md")
    return 0


def embed(cfg) -> int:
    from sonodistill.evaluate.embed import embed as run

    print(f"embeddings written to {run(cfg)}")
    return 0


def analyze(cfg) -> int:
    from sonodistill.evaluate.analyze import analyze as run

    out = run(cfg)
    print((out / "metrics.md").read_text())
    print(f"figure and tables written to {out}")
    return 0
