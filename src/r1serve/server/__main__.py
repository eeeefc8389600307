"""`python -m r1serve.server`: the same as `r1serve serve` (vLLM's `python -m ...api_server` habit)."""

from __future__ import annotations

import sys

from r1serve.server.cli import main

if __name__ == "__main__":
    sys.exit(main())
