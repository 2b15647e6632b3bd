"""Temper: distributed training from one YAML job spec."""
__version__ = "0.1.0"
