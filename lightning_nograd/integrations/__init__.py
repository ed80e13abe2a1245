"""lightning-nograd for training loops other than Lightning's ``Trainer``.

* ``lightning_nograd.integrations.huggingface.NoGradTrainerCallback``: the Hugging Face ``Trainer``;
* ``lightning_nograd.integrations.fabric.NoGradFabricCallback``: a Lightning Fabric loop.

Both drive the same ``NoGradAuditor`` the Lightning ``Trainer`` runs (``_loop.LoopDriver``), so the
findings, their fixes and the measurements are those of a Lightning run. Importing this package imports
neither ``transformers`` nor Fabric.
"""
