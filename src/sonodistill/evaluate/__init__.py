"""Downstream evaluation: datasets, leakage-free splits, probes and fine-tuning, paper tables."""

from sonodistill.evaluate.datasets import (
    ClsDataset,
    DatasetIndex,
    DatasetSpec,
    SegDataset,
    load_busi,
    load_cls_folder,
    load_dataset,
    load_ddti,
    load_seg_folder,
)
from sonodistill.evaluate.metrics import EMPTY_RULE, classification_scores, dice_iou
from sonodistill.evaluate.splits import SplitConfig, load_or_make_splits, make_splits
from sonodistill.evaluate.suite import SuiteConfig, run_suite
from sonodistill.evaluate.train import TrainSettings, run_one

__all__ = [
    "EMPTY_RULE",
    "ClsDataset",
    "DatasetIndex",
    "DatasetSpec",
    "SegDataset",
    "SplitConfig",
    "SuiteConfig",
    "TrainSettings",
    "classification_scores",
    "dice_iou",
    "load_busi",
    "load_cls_folder",
    "load_dataset",
    "load_ddti",
    "load_or_make_splits",
    "load_seg_folder",
    "make_splits",
    "run_one",
    "run_suite",
]
