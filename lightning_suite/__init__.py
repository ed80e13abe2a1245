"""Lightning's own test suite as a standing check: run a slice of ``tests_pytorch`` with and without
``NoGradAuditor()`` in every ``Trainer`` and compare the outcomes (see ``python -m lightning_suite --help``)."""
