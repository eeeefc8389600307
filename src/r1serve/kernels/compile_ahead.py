"""Compile the Triton kernel variants a warm-up would launch, all at once on a thread pool, before running it.

Why: on a machine whose Triton cache is empty (a fresh deployment, a new Triton or a new GPU), the engine's start
compiled ~30 kernel variants one after the other, each when a warm-up first launched it: the decode kernel for
every split count the graphs use, the merge kernel, the skinny products, the sampler. Triton's compiler runs most
of its passes outside the GIL, so they overlap on a thread pool (on the H200's host: 26 variants in 7.1 s).

How: `compile_ahead(warm_ups)` runs `warm_ups()` with every Triton launch that would compile instead handing the
compile to the pool (Triton's `AsyncCompileMode`, through `JITFunction.preload` with the launch's own
specialisation) and returning without running the kernel; it returns once every compile is done, and the real
warm-ups that follow find them in Triton's in-memory cache. Launches that need no compile run as usual. So
`warm_ups` must not depend on what the kernels would have written: the engine runs forwards and sampling whose
results it throws away. The specialisations are exactly the real ones because the launches are the real ones.
Without those Triton hooks (another Triton version), or if anything in the dry run fails, it logs why and
returns, and the kernels compile when first launched, as before.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

logger = logging.getLogger("r1serve")

MAX_WORKERS = 16


def compile_ahead(warm_ups: Callable[[], object], workers: int | None = None) -> int:
    """Runs `warm_ups` with its compiling Triton launches turned into parallel compiles (not run); waits for
    them. Returns the number of kernel variants compiled (0 if Triton's hooks are missing or the run failed)."""
    try:
        from triton import knobs
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError as e:
        logger.info("kernels compile when first launched (%s)", e)
        return 0
    seen: set[tuple[str, str]] = set()

    def on_compile(*, key: Any, fn: Any, compile: dict[str, Any], is_manual_warmup: bool, **_: Any) -> bool:
        if is_manual_warmup:
            return False  # the preload below: let it compile (on the pool)
        if (fn.name, str(key)) not in seen:  # the same variant launched again (another layer) before it is ready
            seen.add((fn.name, str(key)))
            fn.jit_function.preload(compile["specialization_data"])
        return True  # skip this launch

    start = time.perf_counter()
    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = on_compile
    try:
        with ThreadPoolExecutor(workers or min(MAX_WORKERS, os.cpu_count() or 1)) as pool, AsyncCompileMode(pool):
            warm_ups()
    except Exception as e:  # the real warm-ups will compile (and report a kernel's error) one by one
        logger.warning("compiling kernels ahead failed (%s: %s); they compile when first launched",
                       type(e).__name__, e)
        return 0
    finally:
        knobs.runtime.jit_cache_hook = previous
    if seen:
        logger.info("compiled %d kernel variants in %.1f s", len(seen), time.perf_counter() - start)
    return len(seen)
