"""Write the long description the package index shows: the README, with what only works in a clone made safe.

The README links its pictures and the docs pages by paths relative to the repository, which a package
index cannot follow. Here each relative link becomes the page's name and its path in the source
distribution, and each picture a line saying where it is; with a ``Source`` URL in ``[project.urls]``
the pictures link there instead. ``pyproject.toml`` takes the result as the long description, and a test
keeps it up to date with the README.

    python docs/scripts/package_description.py          # rewrites docs/package-description.md
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "docs" / "package-description.md"

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)")


def _relative(url: str) -> bool:
    return not re.match(r"^(https?:|mailto:|#)", url)


def source_url(pyproject: str) -> str | None:
    """The ``Source`` URL of ``[project.urls]``, if the project declares one."""
    found = re.search(r'^"?Source"?\s*=\s*"([^"]+)"', pyproject, flags=re.M)
    return found.group(1).rstrip("/") if found else None


def render(readme: str, source: str | None = None) -> str:
    """``readme`` with its relative links and pictures made safe for a package index.

    Examples:
        >>> print(render("See [Install](docs/install.md).").splitlines()[1])
        See Install (`docs/install.md` in the source distribution).
    """

    def image(match: re.Match[str]) -> str:
        alt, url = match.group(1), match.group(2)
        if not _relative(url):
            return match.group(0)
        if source is not None:
            return f"![{alt}]({source}/{url})"
        return f"*{alt}: a picture in the documentation, `{url}` in the source distribution.*"

    def link(match: re.Match[str]) -> str:
        text, url = match.group(1), match.group(2)
        if not _relative(url):
            return match.group(0)
        return f"{text} (`{url.split('#')[0]}` in the source distribution)"

    header = "<!-- Written by docs/scripts/package_description.py from README.md: edit the README, then run it. -->\n"
    return header + _LINK.sub(link, _IMAGE.sub(image, readme))


def main() -> int:
    text = render((ROOT / "README.md").read_text(), source_url((ROOT / "pyproject.toml").read_text()))
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
