"""Re-make ``docs/images/tensorboard.png``: the ``nograd/val`` scalars of a real quickstart run in TensorBoard.

Runs ``examples/quickstart.py`` (``NoGradAuditor()`` at its defaults) into a temporary directory,
serves its logs with a real TensorBoard and photographs the Scalars dashboard, filtered to
``nograd/val``, with headless Chromium (Debian: ``apt-get install chromium``).

    python docs/scripts/tensorboard_screenshot.py [--out docs/images/tensorboard.png]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read(100)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "tensorboard.png")
    parser.add_argument("--logdir", type=Path, help="photograph these logs instead of a new quickstart run")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        sys.exit("headless Chromium is needed: apt-get install chromium")
    with tempfile.TemporaryDirectory() as tmp:
        logdir = args.logdir
        if logdir is None:
            subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--root-dir", tmp], check=True)
            logdir = Path(tmp) / "lightning_logs"
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(f"http://127.0.0.1:{port}/")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            # the Scalars dashboard draws its charts as SVG, which headless Chromium renders
            url = f"http://127.0.0.1:{port}/?darkMode=false#scalars&tagFilter=nograd%2Fval"
            subprocess.run(
                [browser, "--headless=new", "--no-sandbox", "--hide-scrollbars", "--enable-unsafe-swiftshader",
                 "--window-size=1400,1250", "--virtual-time-budget=25000", f"--screenshot={args.out}", url],
                check=True, capture_output=True, timeout=120,
            )  # fmt: skip
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
