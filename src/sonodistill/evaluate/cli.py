"""`sonodistill evaluate` (and `sonodistill evaluate audit`), `sonodistill embed` and
`sonodistill analyze`: each a typed config (YAML via --config, flags override) handed to the
library function of the same name."""

from __future__ import annotations

from pathlib import Path

from sonodistill.config import parse_config
from sonodistill.errors import unknown_name

EVALUATE = (
    "Downstream evaluation (paper Tables 2, 3, 4, 6, 7): encoders x tasks x protocols x label "
    "fractions x seeds. One JSON per run under OUT/runs (finished runs are skipped), tables "
    "under OUT/tables. Example: sonodistill evaluate --config suites/smoke_cpu. "
    "`sonodistill evaluate audit --config SUITE` audits the suite's splits without training."
)
AUDIT = (
    "Audit the splits of a suite's tasks (made if missing, as `sonodistill evaluate` would): "
    "counts and class balance per split, groups, near-duplicate pairs within and across splits "
    "at the chosen and a looser similarity, conflicting-label duplicates, non-binary masks and "
    "a contact sheet of the closest cross-split pairs, written to OUT/splits/TASK.audit.md|json "
    "and TASK.pairs.png. Exit code 1 when pairs or groups straddle splits."
)


def audit_main(argv: list[str]) -> int:
    from sonodistill.evaluate.audit import LeakError
    from sonodistill.evaluate.suite import SuiteConfig, run_audit

    cfg = parse_config(SuiteConfig, argv, "sonodistill evaluate audit", AUDIT)
    try:
        reports = run_audit(cfg)
    except LeakError as err:
        print(f"sonodistill evaluate audit: {err}")
        return 1
    for r in reports:
        print(Path(cfg.out) / "splits" / f"{r['task']}.audit.md")
    return 0


def evaluate_main(argv: list[str]) -> int:
    from sonodistill.evaluate.suite import SuiteConfig, run_suite

    if argv and argv[0] == "audit":
        return audit_main(argv[1:])
    if argv and not argv[0].startswith("-"):  # no positional argument: a misspelt `audit`
        raise unknown_name("command", argv[0], ["audit"], see="see sonodistill evaluate --help")
    cfg = parse_config(SuiteConfig, argv, "sonodistill evaluate", EVALUATE)
    if cfg.dry_run:
        from sonodistill.evaluate.estimate import dry_run

        print(dry_run(cfg))
        return 0
    for path in run_suite(cfg):
        print(path)
    return 0


def embed_main(argv: list[str]) -> int:
    from sonodistill.evaluate import embed as module

    cfg = parse_config(module.EmbedConfig, argv, "sonodistill embed", module.__doc__)
    print(f"embeddings written to {module.embed(cfg)}")
    return 0


def analyze_main(argv: list[str]) -> int:
    from sonodistill.evaluate import analyze as module

    cfg = parse_config(module.AnalyzeConfig, argv, "sonodistill analyze", module.__doc__)
    out = module.analyze(cfg)
    print((out / "metrics.md").read_text())
    print(f"figure and tables written to {out}")
    return 0
