from __future__ import annotations

from splitserve.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
