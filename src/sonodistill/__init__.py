"""sonodistill: compact ultrasound foundation models distilled from DINOv3."""

__version__ = "0.1.0"
