"""Write docs/compatibility.md from the table in lightning_optx/compatibility.py.

    python scripts/render_compatibility.py            # (re)write the page
    python scripts/render_compatibility.py --check    # exit 1 if the committed page differs from the table
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_optx.compatibility import render_markdown  # noqa: E402

PAGE = ROOT / "docs" / "compatibility.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the page is up to date")
    args = parser.parse_args()
    text = render_markdown()
    if args.check:
        if PAGE.read_text() != text:
            print(f"{PAGE} is out of date: run python scripts/render_compatibility.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
