"""Re-make ``docs/images/wandb.png``: the ``nograd/val`` charts of a real W&B run, in W&B's own viewer.

Runs ``examples/wandb_offline.py`` (the quickstart, ``NoGradAuditor()`` at its defaults, logged by
Lightning's ``WandbLogger`` in offline mode) into a temporary directory, opens the run in W&B LEET
(``wandb leet``, the terminal viewer that ships with ``wandb``, so no account or network is
needed) inside a detached tmux session, filters the charts and the run summary to ``nograd/val``,
and photographs the screen: tmux's copy of it, colours included, drawn as HTML in headless
Chromium (Debian: ``apt-get install tmux chromium``).

    python docs/scripts/wandb_screenshot.py [--out docs/images/wandb.png] [--run DIR]
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COLUMNS, ROWS = 190, 50
CELL_WIDTH, CELL_HEIGHT = 8.5, 17  # px: DejaVu Sans Mono at 14 px, one terminal cell
FOREGROUND, BACKGROUND = "#d0d0d0", "#1c1c1c"


def xterm_colour(index: int) -> str:
    """The RGB of xterm's 256-colour palette entry ``index``."""
    base = ["#000000", "#cd0000", "#00cd00", "#cdcd00", "#0000ee", "#cd00cd", "#00cdcd", "#e5e5e5",
            "#7f7f7f", "#ff0000", "#00ff00", "#ffff00", "#5c5cff", "#ff00ff", "#00ffff", "#ffffff"]  # fmt: skip
    if index < 16:
        return base[index]
    if index < 232:
        steps = [0, 95, 135, 175, 215, 255]
        index -= 16
        r, g, b = steps[index // 36], steps[index // 6 % 6], steps[index % 6]
        return f"#{r:02x}{g:02x}{b:02x}"
    grey = 8 + 10 * (index - 232)
    return f"#{grey:02x}{grey:02x}{grey:02x}"


def ansi_to_html(screen: str) -> str:
    """The SGR-coloured text ``tmux capture-pane -e`` prints, as ``<span>``s with inline styles."""
    fg: str | None = None
    bg: str | None = None
    bold = reverse = False
    out: list[str] = []
    for part in re.split(r"(\x1b\[[0-9;]*m)", screen):
        if not part.startswith("\x1b["):
            if part:
                colour, back = (bg or BACKGROUND, fg or FOREGROUND) if reverse else (fg, bg)
                style = (f"color:{colour};" if colour else "") + (f"background:{back};" if back else "")
                style += "font-weight:bold;" if bold else ""
                # a glyph from a fallback font (the charts' braille dots) keeps to its one cell
                text = "".join(c if c.isascii() else f'<i class="cell">{c}</i>' for c in html.escape(part))
                out.append(f'<span style="{style}">{text}</span>' if style else text)
            continue
        codes = [int(c) if c else 0 for c in part[2:-1].split(";")]
        i = 0
        while i < len(codes):
            code = codes[i]
            if code == 0:
                fg = bg = None
                bold = reverse = False
            elif code == 1:
                bold = True
            elif code == 22:
                bold = False
            elif code == 7:
                reverse = True
            elif code == 27:
                reverse = False
            elif code in (38, 48) and i + 1 < len(codes):
                if codes[i + 1] == 5 and i + 2 < len(codes):
                    colour = xterm_colour(codes[i + 2])
                    i += 2
                elif codes[i + 1] == 2 and i + 4 < len(codes):
                    colour = "#{:02x}{:02x}{:02x}".format(*codes[i + 2 : i + 5])
                    i += 4
                else:
                    colour = None
                if code == 38:
                    fg = colour
                else:
                    bg = colour
            elif 30 <= code <= 37 or 90 <= code <= 97:
                fg = xterm_colour(code - 30 if code < 90 else code - 82)
            elif 40 <= code <= 47 or 100 <= code <= 107:
                bg = xterm_colour(code - 40 if code < 100 else code - 92)
            elif code == 39:
                fg = None
            elif code == 49:
                bg = None
            i += 1
    return "".join(out)


class Tmux:
    """A detached tmux server of its own (its own socket, no user configuration)."""

    def __init__(self, socket: str) -> None:
        self.base = ["tmux", "-L", socket, "-f", "/dev/null"]

    def __call__(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], check=True, capture_output=True, text=True).stdout

    def wait_for(self, text: str, seconds: float = 60.0) -> None:
        deadline = time.monotonic() + seconds
        while text not in self("capture-pane", "-t", "leet", "-p"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"W&B LEET never showed {text!r}")
            time.sleep(0.5)

    def settled_screen(self, seconds: float = 20.0) -> str:
        """The screen, colours included, once two looks half a second apart agree (the charts are drawn)."""
        deadline = time.monotonic() + seconds
        last = None
        while True:
            time.sleep(0.5)
            screen = self("capture-pane", "-t", "leet", "-e", "-p")
            if screen == last or time.monotonic() > deadline:
                return screen
            last = screen

    def keys(self, *keys: str) -> None:
        """Each of ``keys``: a key name (``Enter``) or, in quotes, text typed as it is (``"'nograd/val'"``)."""
        for key in keys:
            if key.startswith("'"):
                self("send-keys", "-t", "leet", "-l", key.strip("'"))
            else:
                self("send-keys", "-t", "leet", key)
            time.sleep(0.5)


#: LEET's layout (``wandb-leet.json``, kept in a configuration folder of the script's own, so yours is
#: neither read nor changed): the run overview, and the metric charts two a row; no system metrics.
LAYOUT = {
    "metrics_grid": {"rows": 4, "cols": 2},
    "left_sidebar_visible": True,
    "right_sidebar_visible": False,
    "metrics_grid_visible": True,
    "console_logs_visible": False,
    "media_visible": False,
}


def photograph(run_dir: Path, out: Path, browser: str, config_home: Path) -> str:
    """Photograph the W&B run in ``run_dir`` into ``out``; returns the screen's text."""
    config_home.mkdir(parents=True, exist_ok=True)
    (config_home / "wandb-leet.json").write_text(json.dumps(LAYOUT))
    tmux = Tmux(f"lightning-nograd-{os.getpid()}")
    leet = shutil.which("wandb", path=os.path.dirname(sys.executable)) or "wandb"
    env = ["-e", "COLORTERM=truecolor", "-e", "TERM=xterm-256color", "-e", f"WANDB_CONFIG_DIR={config_home}"]
    tmux("new-session", "-d", "-s", "leet", "-x", str(COLUMNS), "-y", str(ROWS), *env, f"{leet} leet {run_dir}")
    try:
        tmux.wait_for("Summary [")  # the run is read
        # the charts and the run summary filtered to the validation metrics (LEET keeps the filters of
        # an earlier look at these runs: they are cleared first)
        tmux.keys("C-l", "C-o", "/", "'nograd/val'", "Enter", "o", "'nograd/val'", "Enter")
        tmux.wait_for("filtered from")
        screen = tmux.settled_screen()
    finally:
        subprocess.run([*tmux.base, "kill-server"], capture_output=True)
    page = f"""<!doctype html><meta charset="utf-8"><style>
body {{ margin: 0; background: {BACKGROUND}; }}
pre {{ margin: 0; padding: 8px; color: {FOREGROUND}; font: 14px/{CELL_HEIGHT}px "DejaVu Sans Mono", monospace; }}
i.cell {{ display: inline-block; width: 1ch; font-style: normal; }}
</style><pre>{ansi_to_html(screen)}</pre>"""
    with tempfile.TemporaryDirectory() as tmp:
        page_path = Path(tmp) / "leet.html"
        page_path.write_text(page, encoding="utf-8")
        width, height = int(COLUMNS * CELL_WIDTH) + 16, ROWS * CELL_HEIGHT + 16
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [browser, "--headless=new", "--no-sandbox", "--hide-scrollbars", f"--window-size={width},{height}",
             f"--screenshot={out.resolve()}", page_path.as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    return re.sub(r"\x1b\[[0-9;]*m", "", screen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "wandb.png")
    parser.add_argument("--run", type=Path, help="photograph this W&B run directory instead of a new run")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None or shutil.which("tmux") is None:
        sys.exit("tmux and headless Chromium are needed: apt-get install tmux chromium")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run
        if run_dir is None:
            env = {**os.environ, "WANDB_MODE": "offline"}
            script = ROOT / "examples" / "wandb_offline.py"
            subprocess.run([sys.executable, str(script), "--root-dir", tmp], check=True, env=env)
            run_dir = next((Path(tmp) / "wandb").glob("offline-run-*"))
        photograph(run_dir, args.out, browser, Path(tmp) / "config")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
