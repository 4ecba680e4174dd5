"""Downstream evaluation: datasets, leakage-free splits, probes and fine-tuning, paper tables.

Public names are imported on first use (PEP 562), so that importing the package (or a light
module in it) loads no torch.
"""

from sonodistill.utils.lazy import lazy_exports

_EXPORTS = {
    "AnalyzeConfig": "sonodistill.evaluate.config",
    "DATASET_FORMATS": "sonodistill.evaluate.config",
    "DatasetSpec": "sonodistill.evaluate.config",
    "EmbedConfig": "sonodistill.evaluate.config",
    "PROTOCOLS": "sonodistill.evaluate.config",
    "SEG_DECODERS": "sonodistill.evaluate.config",
    "SplitConfig": "sonodistill.evaluate.config",
    "SuiteConfig": "sonodistill.evaluate.config",
    "TrainSettings": "sonodistill.evaluate.config",
    "ClsDataset": "sonodistill.evaluate.datasets",
    "DatasetIndex": "sonodistill.evaluate.datasets",
    "SegDataset": "sonodistill.evaluate.datasets",
    "load_busi": "sonodistill.evaluate.datasets",
    "load_cls_folder": "sonodistill.evaluate.datasets",
    "load_dataset": "sonodistill.evaluate.datasets",
    "load_ddti": "sonodistill.evaluate.datasets",
    "load_seg_folder": "sonodistill.evaluate.datasets",
    "EMPTY_RULE": "sonodistill.evaluate.metrics",
    "classification_scores": "sonodistill.evaluate.metrics",
    "dice_iou": "sonodistill.evaluate.metrics",
    "load_or_make_splits": "sonodistill.evaluate.splits",
    "make_splits": "sonodistill.evaluate.splits",
    "run_suite": "sonodistill.evaluate.suite",
    "run_one": "sonodistill.evaluate.train",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
