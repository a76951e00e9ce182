"""GDPO, group distributional preference optimization: ``trainer`` (``GDPOConfig``/``GDPOTrainer``) and
``evaluate`` (belief inference and the JS-distance metrics)."""

from grouppo.gdpo.trainer import GDPOConfig, GDPOTrainer

__all__ = ["GDPOConfig", "GDPOTrainer"]
