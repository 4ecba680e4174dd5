"""`sonodistill evaluate`, `sonodistill embed` and `sonodistill analyze`: each a typed config
(YAML via --config, flags override) handed to the library function of the same name."""

from __future__ import annotations

from sonodistill.config import parse_config

EVALUATE = (
    "Downstream evaluation (paper Tables 2, 3, 4, 6, 7): encoders x tasks x protocols x label "
    "fractions x seeds. One JSON per run under OUT/runs (finished runs are skipped), tables "
    "under OUT/tables. Example: sonodistill evaluate --config suites/smoke_cpu"
)


def evaluate_main(argv: list[str]) -> int:
    from sonodistill.evaluate.suite import SuiteConfig, run_suite

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
