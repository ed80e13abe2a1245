"""Thin Lightning callbacks over the framework-free core."""

from lightning_nograd.callbacks.backprop_guard import BackpropGuard
from lightning_nograd.callbacks.eval_mode_auditor import EvalModeAuditor
from lightning_nograd.callbacks.nograd_auditor import NoGradAuditor
from lightning_nograd.callbacks.savings_monitor import SavingsMonitor

__all__ = ["BackpropGuard", "EvalModeAuditor", "NoGradAuditor", "SavingsMonitor"]
