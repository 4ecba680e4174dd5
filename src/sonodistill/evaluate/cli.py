"""`sonodistill evaluate`: run a downstream suite (YAML via --config, flags override)."""

from __future__ import annotations

from sonodistill.config import parse_config
from sonodistill.evaluate.suite import SuiteConfig, run_suite

DESCRIPTION = (
    "Downstream evaluation (paper Tables 2, 3, 4, 6, 7): encoders x tasks x protocols x label "
    "fractions x seeds. One JSON per run under OUT/runs (finished runs are skipped), tables "
    "under OUT/tables. Example: sonodistill evaluate --config suites/smoke_cpu"
)


def main(argv: list[str]) -> int:
    cfg = parse_config(SuiteConfig, argv, "sonodistill evaluate", DESCRIPTION)
    for path in run_suite(cfg):
        print(path)
    return 0
