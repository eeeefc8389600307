"""One table row from `offline.py`'s JSON line (stdin): weights, KV cache, weight GiB, KV tokens, batch-1 decode
with its percent of the format's own roofline, and each batched workload's tokens/s. `device_session.sh
quant-offline` prints one row per weight format with it.

    python3 benchmarks/offline.py ... | tail -1 | python3 benchmarks/offline_summary.py w4a16 auto
"""

from __future__ import annotations

import json
import sys


def row(result: dict, weights: str, kv: str) -> str:
    rates = {r["workload"]: r["tokens_per_s"] for r in result["rows"] if r["engine"] == "r1serve"}
    cells = [weights, kv, f"{result['weight_gib']:.2f} GiB", f"{result['kv_cache_tokens']:,} KV tokens",
             f"decode {rates.get('decode', 0):.1f} tok/s ({result.get('decode_pct_of_roofline', 0):.0f}% of "
             f"{result.get('decode_roofline_tok_s', 0):.0f})"]
    cells += [f"{name} {rates[name]:,.0f}" for name in ("nano", "uniform") if name in rates]
    return " | ".join(cells)


if __name__ == "__main__":
    print(row(json.loads(sys.stdin.read()), *sys.argv[1:3]))
