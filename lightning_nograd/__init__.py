"""lightning-nograd: cheap, correct validation and training that never silently stops learning."""

from lightning_nograd.callbacks.backprop_guard import BackpropGuard
from lightning_nograd.callbacks.eval_mode_auditor import EvalModeAuditor
from lightning_nograd.callbacks.nograd_auditor import NoGradAuditor
from lightning_nograd.callbacks.savings_monitor import SavingsMonitor
from lightning_nograd.errors import BrokenBackpropWarning, NoGradError, NoGradWarning
from lightning_nograd.plain_pytorch import audit, check_training_step

__version__ = "0.1.0"

__all__ = [
    "BackpropGuard",
    "BrokenBackpropWarning",
    "EvalModeAuditor",
    "NoGradAuditor",
    "NoGradError",
    "NoGradWarning",
    "SavingsMonitor",
    "audit",
    "check_training_step",
]
