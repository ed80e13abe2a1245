"""Thin Lightning callbacks over the framework-free core."""

from lightning_nograd.callbacks.backprop_guard import BackpropGuard
from lightning_nograd.callbacks.eval_mode_auditor import EvalModeAuditor

__all__ = ["BackpropGuard", "EvalModeAuditor"]
