"""`python -m r1serve.bench` runs the same command as `r1serve bench`."""

from __future__ import annotations

import sys

from r1serve.bench.cli import main

sys.exit(main())
