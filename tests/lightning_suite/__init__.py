"""Lightning's own test suite as a standing check: run a slice of ``tests_pytorch`` with and without
``NoGradAuditor()`` in every ``Trainer`` and compare the outcomes (see ``python -m tests.lightning_suite --help``).

``lightning-2.6.5-tests.tar.gz`` is the ``tests/`` folder of Lightning (https://github.com/Lightning-AI/pytorch-lightning)
at tag 2.6.5, unmodified, under the Apache License 2.0 (the same license as this project; see ``LICENSE``),
copyright The Lightning AI team. It is kept here because Lightning's sdists ship no tests.
"""
