"""Framework-free core: probes on ``torch.nn.Module`` trees, findings and measurements.

Nothing in this package imports Lightning.
"""
