"""`r1serve bench`: serving benchmark for any OpenAI-compatible endpoint, r1serve's or another's.

It streams requests with `httpx` and its own SSE parser so every chunk carries the time it arrived, and
reports what `vllm bench serve` reports (TTFT, TPOT, ITL, end-to-end latency, throughput, goodput) plus what
a reasoning model needs: the time to the first answer token after `</think>`. It never imports the engine
or torch, so it measures a remote server as well as a local one. Modules: `sse` (parsing), `stream` (one
response), `request` (one request), `workloads` and `tokens` (prompts), `load` (when to send), `metrics`,
`runner` (endpoints and points), `report` and `plots` (output), `cli` (the command).
"""

from __future__ import annotations

from r1serve.bench.cli import main

__all__ = ["main"]
