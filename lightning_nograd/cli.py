"""``lightning-nograd audit``: audit a LightningModule without editing its training script.

Exit codes: 0 clean, 1 findings (so it can gate a CI pipeline), 2 bad arguments (found before
anything runs), 3 the audit could not finish (the model crashed, or has no data to run on).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXAMPLE = """example:
  lightning-nograd audit examples.quickstart:Classifier --data examples.quickstart:SyntheticData \\
      --init-args '{"planted_bug": true}' --json nograd_report.json
  lightning-nograd audit my_project.models:MyModel --allow-train-mode 'head\\.mc_dropout'
  python -m lightning_nograd audit my_project.models:MyModel   # the model's own dataloaders

exit status: 0 clean, 1 findings, 2 bad arguments, 3 the audit could not finish."""

CLEAN, FINDINGS, BAD_ARGUMENTS, INCOMPLETE = 0, 1, 2, 3

#: The allow-list options, named and meant as the ``NoGradAuditor`` arguments they are passed to.
ALLOW_OPTIONS = {
    "allow_train_mode": "modules that may stay in train mode during evaluation (MC dropout on purpose)",
    "allow_grad": "modules that may run with gradients enabled during evaluation (test-time optimisation)",
    "allow": "modules or parameters that may be frozen under no_grad or go without a gradient in training",
}


#: How the report's notes name the settings they advise: as this command's options.
OPTION_NAMES = {"budget": "--budget", "repeats": "--repeats"}


class UsageError(Exception):
    """A bad argument or import path: one line on stderr, exit 2."""


def _load(spec: str, argument: str) -> Any:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"{argument} must look like 'package.module:ClassName', got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise UsageError(f"cannot import {module_name!r} for {argument}: {type(err).__name__}: {err}") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise UsageError(f"{module_name!r} has no attribute {attribute!r} ({argument})") from None


def _json_object(text: str | None, argument: str) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{argument} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{argument} must be a JSON object, got {type(value).__name__}")
    return value


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _lightning_base(cls: Any, base: str, argument: str) -> Any:
    """The ``lightning.pytorch`` or ``pytorch_lightning`` package whose ``base`` class ``cls`` subclasses."""
    if not inspect.isclass(cls):
        raise UsageError(f"{argument} must name a class, got {type(cls).__name__}")
    for name in ("lightning.pytorch", "pytorch_lightning"):
        package = sys.modules.get(name)
        if package is not None and issubclass(cls, getattr(package, base)):
            return package
    raise UsageError(f"{argument} must be a {base} subclass, got {cls.__name__}")


def _build(cls: Any, kwargs: dict[str, Any], argument: str) -> Any:
    try:
        return cls(**kwargs)
    except Exception as err:
        raise UsageError(f"cannot build {cls.__name__} from {argument}: {_one_line(err)}") from None


def _check_writable(path: str) -> None:
    """Refuse a ``--json`` no report can be written to, before anything trains; missing folders are created
    when writing, as the callback's ``report_path`` does."""
    from lightning_nograd.core.reporting.report import unwritable_reason

    problem = unwritable_reason(Path(path))
    if problem == "it is a directory":
        raise UsageError(f"--json must name a file, got the directory {path!r}")
    if problem is not None:
        raise UsageError(f"--json cannot be written to {path!r}: {problem}")


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(
        prog="lightning-nograd",
        description="Audit Lightning models for no_grad / eval-mode problems and broken backprop.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = main.add_subparsers(dest="command", required=True)
    audit = commands.add_parser(
        "audit",
        help="run a short fit, validate and test with NoGradAuditor and report",
        description="Build the model (and datamodule), run a short fit, validate and test on a few batches "
        "with NoGradAuditor(), print the report; exit 1 when there are findings.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    audit.add_argument("model", help="the LightningModule class, as package.module:ClassName")
    audit.add_argument("--data", help="a LightningDataModule class, as package.module:ClassName")
    audit.add_argument("--init-args", help="JSON object of keyword arguments for the model")
    audit.add_argument("--data-init-args", help="JSON object of keyword arguments for the datamodule")
    audit.add_argument("--batches", type=int, default=4, help="batches per stage (default 4)")
    audit.add_argument("--json", dest="json_path", help="write the report as JSON to this path")
    audit.add_argument(
        "--budget",
        type=float,
        default=1.0,
        help="share of the audit's run time the savings replays may take (default 1.0: as much as the run itself)",
    )
    audit.add_argument(
        "--repeats",
        type=int,
        help="timed runs per grad mode for the time saved, whatever the budget (default: as --budget allows)",
    )
    allow = audit.add_argument_group(
        "allow-lists",
        "regular expressions over module or parameter paths (a path matches when it or one of its parents "
        "full-matches); each option can be given several times and means what the NoGradAuditor argument "
        "of the same name means",
    )
    for option, meaning in ALLOW_OPTIONS.items():
        allow.add_argument(
            f"--{option.replace('_', '-')}", dest=option, action="append", default=[], metavar="PATTERN", help=meaning
        )
    return main


def run_audit(args: argparse.Namespace) -> int:
    from lightning_nograd.callbacks.nograd_auditor import NoGradAuditor
    from lightning_nograd.core.reporting.summary import render

    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # our report is the output
    # every argument is checked before anything runs
    if args.batches < 1:
        raise UsageError(f"--batches must be at least 1, got {args.batches}")
    if not 0 <= args.budget <= 1000 or args.budget != args.budget:
        raise UsageError(f"--budget must be between 0 and 1000, got {args.budget}")
    if args.repeats is not None and args.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {args.repeats}")
    if args.data_init_args is not None and not args.data:
        raise UsageError("--data-init-args needs --data (the datamodule it is for)")
    if args.json_path:
        _check_writable(args.json_path)
    allow_lists = {name: getattr(args, name) for name in ALLOW_OPTIONS}
    for name, patterns in allow_lists.items():
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                option = f"--{name.replace('_', '-')}"
                raise UsageError(f"{option} must be a regular expression, got {pattern!r} ({err})") from None
    model_cls = _load(args.model, "MODEL")
    lightning = _lightning_base(model_cls, "LightningModule", "MODEL")
    data_cls = _load(args.data, "--data") if args.data else None
    if data_cls is not None:
        _lightning_base(data_cls, "LightningDataModule", "--data")
    model_kwargs = _json_object(args.init_args, "--init-args")
    data_kwargs = _json_object(args.data_init_args, "--data-init-args")
    model = _build(model_cls, model_kwargs, "MODEL")
    datamodule = _build(data_cls, data_kwargs, "--data") if data_cls is not None else None
    auditor = NoGradAuditor(verbose=False, budget=args.budget, repeats=args.repeats, **allow_lists)
    options: dict[str, Any] = dict(
        callbacks=[auditor],
        max_epochs=2,
        limit_train_batches=args.batches,
        limit_val_batches=args.batches,
        limit_test_batches=args.batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    crashed: str | None = None
    stage = "fit"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report below says it all, once
        try:
            trainer = lightning.Trainer(**options)
            trainer.fit(model, datamodule=datamodule)
            if type(model).validation_step is not lightning.LightningModule.validation_step:
                stage = "validate"
                trainer.validate(model, datamodule=datamodule, verbose=False)
            if type(model).test_step is not lightning.LightningModule.test_step:
                stage = "test"
                trainer.test(model, datamodule=datamodule, verbose=False)
        except Exception as err:
            crashed = f"`trainer.{stage}` stopped with {_one_line(err)}"
    print(render(auditor.report, incomplete=crashed, option_names=OPTION_NAMES), end="")
    if args.json_path:
        try:
            auditor.report.write_json(args.json_path)
        except OSError as err:  # the path changed under the run: no traceback, and not the "findings" code
            raise UsageError(f"--json could not be written to {args.json_path!r}: {err}") from None
        print(f"report written to {Path(args.json_path).resolve()}")
    if crashed:
        return INCOMPLETE
    return FINDINGS if auditor.report.findings else CLEAN


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-nograd`` and ``python -m lightning_nograd``."""
    args = parser().parse_args(argv)
    try:
        return run_audit(args)
    except UsageError as err:
        print(f"lightning-nograd: error: {err}", file=sys.stderr)
        return BAD_ARGUMENTS


if __name__ == "__main__":
    sys.exit(main())
