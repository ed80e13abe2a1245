"""The README and the docs site say what the code does: the front page's shape, every finding kind,
every argument and every metric named where the reference says it is."""

from __future__ import annotations

import importlib.util
import inspect
import re
import shutil
from pathlib import Path

import pytest

from lightning_nograd import BackpropGuard, EvalModeAuditor, NoGradAuditor, SavingsMonitor
from lightning_nograd.callbacks import savings_monitor
from tests.helpers import Regressor, fit_logged_to_wandb_offline, read_wandb_offline

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_the_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    head = "\n".join(lines[:25])
    # what it is, the two set-up commands and the one-line use, all within the first 25 lines
    assert 'pip install -e ".[tensorboard,rich]" && python examples/quickstart.py' in head  # the table as shown
    assert 'pip install -e ".[dev]" && python -m pytest -q' in head
    assert "trainer = pl.Trainer(callbacks=[NoGradAuditor()])" in head
    # the pictures and the pages it links to exist
    text = "\n".join(lines)
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        assert (ROOT / target).exists(), target


def test_every_docs_page_is_in_the_site_and_every_link_resolves() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")} - {"package-description.md"}  # the index's
    assert pages == set(re.findall(r":\s+([\w/-]+\.md)$", config, flags=re.M))
    for page in DOCS.rglob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / target).exists(), (page.name, target)


def test_every_finding_kind_has_its_section() -> None:
    from lightning_nograd.core.reporting import messages

    # each kind's text is built by the function of its name in `core/reporting/messages.py`
    emitted = {
        name for name, f in vars(messages).items() if inspect.isfunction(f) and f.__module__ == messages.__name__
    }
    emitted -= {"shown", "allow_pattern", "allow_hint"}  # helpers, not kinds
    assert len(emitted) >= 10, emitted
    for path in (ROOT / "lightning_nograd").rglob("*.py"):
        emitted |= set(re.findall(r'Finding\(\s*"([a-z_]+)"', path.read_text()))
        emitted |= set(re.findall(r'GradientGap\(\s*"([a-z_]+)"', path.read_text()))
        emitted |= set(re.findall(r'kind="([a-z_]+)"', path.read_text()))
    page = (DOCS / "reference" / "findings.md").read_text()
    documented = set(re.findall(r"^## `([a-z_]+)`$", page, flags=re.M))
    assert {"train_mode", "grad_enabled", "no_grad_module", "param_without_grad"} <= documented
    assert emitted <= documented, emitted - documented


def test_every_argument_is_in_its_reference_page() -> None:
    pages = {
        NoGradAuditor: "nograd-auditor.md",
        EvalModeAuditor: "eval-mode-auditor.md",
        SavingsMonitor: "savings-monitor.md",
        BackpropGuard: "backprop-guard.md",
    }
    for cls, page in pages.items():
        text = (DOCS / "reference" / page).read_text()
        for name in inspect.signature(cls).parameters:
            assert f"{name}=" in text or f"`{name}`" in text, (cls.__name__, name)


def test_every_savings_metric_is_in_the_metrics_table() -> None:
    table = (DOCS / "reference" / "metrics.md").read_text()
    for key in savings_monitor._KEYS:
        assert f"| `nograd/{{stage}}/{key}` |" in table, key


def test_the_wandb_picture_is_photographed_from_a_real_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``docs/scripts/wandb_screenshot.py`` shows a real offline W&B run in W&B's own viewer: the charts and
    the run summary of the ``nograd/val`` keys, as the docs' picture does."""
    pytest.importorskip("wandb")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None or shutil.which("tmux") is None:
        pytest.skip("needs tmux and headless Chromium")
    fit_logged_to_wandb_offline(tmp_path, monkeypatch, Regressor())
    spec = importlib.util.spec_from_file_location("wandb_screenshot", ROOT / "docs" / "scripts" / "wandb_screenshot.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    out = tmp_path / "wandb.png"
    screen = script.photograph(run_dir, out, browser, tmp_path / "leet-config")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history, _ = read_wandb_offline(tmp_path)
    logged = {key for row in history for key in row if key.startswith("nograd/val/")}
    assert {"nograd/val/graph_memory_mib", "nograd/val/memory_saved_mib", "nograd/val/violations"} <= logged
    # a chart for each nograd/val key the run logged, and nothing else
    assert f"Metrics [1-{len(logged)} of {len(logged)} filtered from" in screen
    for key in logged:
        assert key in screen, key
    assert "nograd/train" not in screen


def test_the_docs_front_page_shows_the_readme_s_table() -> None:
    # one run's table, the one the pictures were made from, on both front pages
    def table(text: str) -> str:
        start = text.index("```text\n")
        return text[start : text.index("```", start + 8)]

    readme, index = (ROOT / "README.md").read_text(), (DOCS / "index.md").read_text()
    assert table(readme) == table(index)
    assert "lightning-nograd report" in table(readme) and "│ validation │" in table(readme)


def test_the_package_index_gets_the_readme_with_nothing_that_needs_a_clone() -> None:
    spec = importlib.util.spec_from_file_location(
        "package_description", ROOT / "docs" / "scripts" / "package_description.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    readme, pyproject = (ROOT / "README.md").read_text(), (ROOT / "pyproject.toml").read_text()
    described = (DOCS / "package-description.md").read_text()
    assert described == script.render(readme, script.source_url(pyproject)), "run docs/scripts/package_description.py"
    assert 'readme = { file = "docs/package-description.md", content-type = "text/markdown" }' in pyproject
    # every link and picture on the index page is absolute, or none is a link at all
    targets = re.findall(r"\]\(([^)\s]+)\)", described)
    assert all(t.startswith(("https://", "http://", "#")) for t in targets), targets
    assert "docs/install.md` in the source distribution" in described


def test_one_stated_duration_for_the_quickstart_and_for_command_1() -> None:
    # measured on a fresh clone on an idle 2-core machine (README command 1: 107 s, the quickstart 39 s)
    places = [ROOT / "README.md", DOCS / "install.md", DOCS / "examples.md", ROOT / "examples" / "quickstart.py"]
    stated = r"about \d+ (?:s|seconds|minutes?)\b|under a minute|\d+ min \d+ s"
    for place in places:
        found = set(re.findall(stated, place.read_text()))
        assert found and found <= {"about 40 s", "about 2 minutes"}, (place.name, found)
    assert "the quickstart itself about 40 s" in (ROOT / "README.md").read_text()
