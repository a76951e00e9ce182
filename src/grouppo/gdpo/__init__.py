"""GDPO, group distributional preference optimization: ``trainer`` (``GDPOConfig``/``GDPOTrainer``) and
``beliefs`` (belief inference and the JS-distance metrics)."""

from grouppo.gdpo.trainer import GDPOConfig, GDPOTrainer

__all__ = ["GDPOConfig", "GDPOTrainer"]
