"""Run every benchmark and write ``benchmarks/results/``: a markdown report and PNG plots.

    python -m benchmarks.run [--quick] [--out benchmarks/results] [--parts accuracy,overhead]

* ``grad_modes``: what gradients cost in evaluation (ms/batch, graph bytes, peak memory), with
  gradients on, under ``no_grad`` and under ``inference_mode``;
* ``overhead``: what the callbacks cost, side by side with plain runs;
* ``accuracy``: SavingsMonitor's estimate against a full A/B of whole validation epochs.

From eight to thirty minutes on 2 CPU cores, as busy as the machine is; ``--quick`` (for CI) under a
minute. On a GPU the same command
measures CUDA time (synchronised) and the CUDA allocator's peak, counts the host-device
synchronisations the callbacks cause (``benchmarks.gpu_sync``), writes to ``benchmarks/results/gpu``
and fills the GPU section of ``docs/benchmarks.md`` instead of the CPU one.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks import accuracy, gpu_sync, grad_modes, overhead


def iqr_bars(centers: list[float], lows: list[float], highs: list[float]) -> list[list[float]]:
    """Matplotlib ``yerr`` for bars at ``centers`` spanning ``lows`` to ``highs``."""
    # a centre taken from medians of unpaired runs can fall outside the paired IQR: no negative bar
    below = [max(0.0, c - lo) for c, lo in zip(centers, lows, strict=True)]
    above = [max(0.0, hi - c) for c, hi in zip(centers, highs, strict=True)]
    return [below, above]


def _plot_grad_modes(rows: list[dict[str, Any]], out: Path) -> str:
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.27
    for i, mode in enumerate(grad_modes.MODES):
        picked = [next(r for r in rows if r["model"] == m and r["mode"] == mode) for m in models]
        values = [r["ms_median"] for r in picked]
        errors = iqr_bars(values, [r["ms_q1"] for r in picked], [r["ms_q3"] for r in picked])
        ax.bar([x + (i - 1) * width for x in range(len(models))], values, width, yerr=errors, label=mode)
    ax.set_xticks(range(len(models)), models, fontsize=8)
    ax.set_ylabel("ms per batch (median, IQR)")
    ax.set_title("Eval-mode forward: gradients on vs no_grad vs inference_mode")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "grad_modes.png", dpi=110)
    plt.close(fig)
    return "grad_modes.png"


def _plot_overhead(rows: list[dict[str, Any]], out: Path) -> str:
    import matplotlib.pyplot as plt

    labels = [f"{r['experiment']}\n{r['model']}" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(range(len(rows)), [r["own_time_pct_median"] for r in rows], color="tab:green")
    ax.axhline(1.0, color="tab:red", linestyle="--", label="1% target")
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("callback's own time, % of epoch")
    ax.set_title("What the callbacks add to an epoch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "overhead.png", dpi=110)
    plt.close(fig)
    return "overhead.png"


def _plot_accuracy(rows: list[dict[str, Any]], out: Path) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(rows))
    ab = [r["ab_time_saved_pct"] for r in rows]
    ab_err = iqr_bars(ab, [r["ab_iqr_pct"][0] for r in rows], [r["ab_iqr_pct"][1] for r in rows])
    ax.bar([x - 0.2 for x in xs], ab, 0.4, yerr=ab_err, label="A/B of whole epochs (IQR)")
    est = [r["estimate_time_saved_pct"] for r in rows]
    est_err = iqr_bars(est, [r["estimate_iqr_pct"][0] for r in rows], [r["estimate_iqr_pct"][1] for r in rows])
    ax.bar([x + 0.2 for x in xs], est, 0.4, yerr=est_err, label="SavingsMonitor (IQR)")
    ax.set_xticks(list(xs), [r["model"].replace(" (", "\n(") for r in rows], fontsize=8)
    ax.set_ylabel("validation time saved by no_grad, %")
    ax.set_title("SavingsMonitor estimate vs full A/B")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)
    return "accuracy.png"


def plot(results: dict[str, Any], out: Path) -> list[str]:
    """Draw the plot of every part present in ``results``; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    drawers = {"grad_modes": _plot_grad_modes, "overhead": _plot_overhead, "accuracy": _plot_accuracy}
    return [draw(results[name], out) for name, draw in drawers.items() if name in results]


README = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def markers(cuda: bool) -> tuple[str, str]:
    """The markers of the docs' Benchmarks page between which this device's results go."""
    name = "benchmarks-gpu" if cuda else "benchmarks"
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def update_readme(lines: list[str], out: Path, cuda: bool) -> None:
    """Put the latest tables and plots between the benchmark markers of the docs' Benchmarks page."""
    text = README.read_text()
    START, END = markers(cuda)
    if START not in text or END not in text:
        return
    # no image links: the plots live beside the results, outside the docs
    body = [line for line in lines[2:] if not line.startswith("![")]
    body.append(f"Plots: `{out.as_posix()}/*.png` in the source tree.")
    body = [line.replace("## ", "### ", 1) if line.startswith("## ") else line for line in body]
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    README.write_text(before + START + "\n" + "\n".join(body).strip() + "\n" + END + after)


SECTIONS = {
    "grad_modes": ("What gradients cost in evaluation", grad_modes.table, "grad_modes.png"),
    "overhead": ("What the callbacks cost", overhead.table, "overhead.png"),
    "accuracy": ("How close SavingsMonitor comes to a full A/B", accuracy.table, "accuracy.png"),
    "gpu_sync": ("Host-device synchronisations", gpu_sync.table, None),
}
SYNC_NOTE = [
    'A 3-epoch fit of the ResNet under `torch.cuda.set_sync_debug_mode("warn")`, every synchronising',
    "call attributed by its Python stack (`benchmarks/gpu_sync.py`): `per_batch` must be 0 after the",
    "first epoch; `per_epoch` is the synchronised epoch clock; `replay` is the budgeted savings replay.",
    "",
]


def report(results: dict[str, Any], quick: bool, cuda: bool) -> list[str]:
    """The markdown report of ``results``; a part that did not finish is named as missing."""
    expected = [name for name in SECTIONS if name != "gpu_sync" or cuda]
    missing = [name for name in expected if name not in results]
    lines = [
        "# lightning-nograd benchmarks" + (" (quick smoke run: not for reading)" if quick else ""),
        "",
        f"Machine: {results['machine']}. {took(results)}"
        + at_commits(results)
        + ". Each model runs in a fresh process",
        "with glibc's allocator settled (`SETTLED_MALLOC_ENV` in `lightning_nograd/core/savings/epoch_measures.py`)",
        "unless a row says otherwise.",
        "",
    ]
    if missing:
        lines += [f"Not measured in this run (it was stopped first): {', '.join(missing)}.", ""]
    for name in expected:
        if name not in results:
            continue
        title, table, image = SECTIONS[name]
        lines += [f"## {title}", "", *(SYNC_NOTE if name == "gpu_sync" else []), *table(results[name]), ""]
        if image is not None:
            lines += [f"![{name.replace('_', ' ')}]({image})", ""]
    return lines


def took(results: dict[str, Any]) -> str:
    """How long the run that wrote ``results`` took, naming its parts when others were kept."""
    latest = results.get("latest") or []
    if latest and len(latest) < len([name for name in SECTIONS if name in results]):
        return f"The last run ({', '.join(latest)}) took {results['minutes']:.1f} min"
    return f"Took {results['minutes']:.1f} min"


def at_commits(results: dict[str, Any]) -> str:
    """ ", code at commit X", or which parts were measured at which commit when they differ."""
    commits = {name: c for name, c in (results.get("commits") or {}).items() if name in results}
    if len(set(commits.values())) > 1:
        by_commit: dict[str, list[str]] = {}
        for name, c in commits.items():
            by_commit.setdefault(str(c), []).append(name.replace("_", " "))
        return ", code at commit " + "; ".join(f"{c} ({', '.join(names)})" for c, names in by_commit.items())
    return f", code at commit {results['commit']}" if results.get("commit") else ""


def commit() -> str | None:
    """The checkout's commit, when it is a git checkout; ``BENCH_COMMIT`` overrides it.

    (A device machine may get this working tree on top of an older ``.git``: the command that
    sends it names the commit.)
    """
    import os
    import subprocess

    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]

    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or None


def measure(results: dict[str, Any], parts: dict[str, Callable[[], list[dict[str, Any]]]], path: Path) -> None:
    """Run ``parts`` in order into ``results``, each labelled with the commit that measured it."""
    started = time.perf_counter()
    here = commit()
    for name, run in parts.items():
        results[name] = run()
        results.setdefault("commits", {})[name] = here
        results["minutes"] = (time.perf_counter() - started) / 60
        results["latest"] = [*results.get("latest", []), name]
        # written after every part: a later failure (or a time limit) loses nothing measured so far
        path.write_text(json.dumps(results, indent=2))


def kept_from(path: Path, machine: str, keep: list[str]) -> dict[str, Any]:
    """The parts ``keep`` of an earlier results file, if it was measured on this same machine."""
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    if earlier.get("machine") != machine:
        return {}
    commits = earlier.get("commits") or {name: earlier.get("commit") for name in SECTIONS}
    kept = {name: earlier[name] for name in keep if name in earlier}
    return {**kept, "commits": {name: commits.get(name) for name in kept}} if kept else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run for CI (under a minute)")
    parser.add_argument("--out", help="default: benchmarks/results, or benchmarks/results/gpu on a GPU")
    parser.add_argument("--report-only", action="store_true", help="re-render the report from OUT/results.json")
    parser.add_argument(
        "--parts",
        help="comma-separated parts to measure, in this order (default: all); the others are kept from "
        "OUT/results.json when it was measured on the same machine, each labelled with its commit",
    )
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    out = Path(args.out or ("benchmarks/results/gpu" if cuda else "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    results_path = out / f"results{suffix}.json"
    if args.report_only:
        results: dict[str, Any] = json.loads(results_path.read_text())
        cuda = not results["machine"].startswith("CPU")  # as `overhead.environment()` writes it
    else:
        parts: dict[str, Callable[[], list[dict[str, Any]]]] = {
            "grad_modes": lambda: grad_modes.run_all(args.quick),
            "overhead": lambda: overhead.run_all(args.quick),
            "accuracy": lambda: accuracy.run_all(args.quick),
        }
        if cuda:
            parts["gpu_sync"] = lambda: [gpu_sync.count("resnet", 3, callback) for callback in (False, True)]
        chosen = args.parts.split(",") if args.parts else list(parts)
        unknown = [name for name in chosen if name not in parts]
        if unknown:
            parser.error(f"--parts: expected names from {', '.join(parts)}, got {', '.join(unknown)}")
        machine = overhead.environment()
        kept = kept_from(results_path, machine, [name for name in parts if name not in chosen])
        results = {"machine": machine, "commit": commit(), "minutes": 0.0, **kept}
        measure(results, {name: parts[name] for name in chosen}, results_path)
    images = plot(results, out)
    lines = report(results, args.quick, cuda)
    (out / f"RESULTS{suffix}.md").write_text("\n".join(lines))
    if not args.quick:
        update_readme(lines, out, cuda)
    print("\n".join(lines))
    print(f"wrote {out}/RESULTS{suffix}.md, {results_path.name} and {', '.join(images)}")


if __name__ == "__main__":
    main()
