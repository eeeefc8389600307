#!/usr/bin/env bash
# Data-parallel replicas behind vllm-router, measured through the front by r1serve bench (1.5B dummy weights).
#   usage: benchmarks/dp_sweep.sh TOKENIZER_DIR OUT_DIR
# For each router policy (cache_aware, round_robin): the time until the front is healthy; with cache_aware also
# the nano-vllm workload scaled to 256 x N requests and 1,024 in / 1,024 out at 256 x N streams; with both, a
# repeated-sampling workload (DP_GROUPS prompts x DP_SAMPLES requests each, as a cons@64 evaluation sends) and
# the replicas' summed prefix-cache hit rate (their /metrics). Last, one replica is killed during a run: the
# bench's failed-request count says what that cost. Environment: DP_SIZE (default 2), CUDA_VISIBLE_DEVICES (a
# dry run on one GPU: DP_GPUS=0,0 with SERVE_ARGS="--gpu-memory-utilization 0.4"), DP_SCALE (request counts
# multiplier, default 1), DP_BASE (requests and streams per replica, default 256), DP_LONG=0 (skip 1,024/1,024),
# DP_GROUPS / DP_SAMPLES (64 / 64), PORT (8000).
set -uo pipefail
tok=$1; out=$2; n=${DP_SIZE:-2}; port=${PORT:-8000}; scale=${DP_SCALE:-1}; base=${DP_BASE:-256}
read -r -a r1serve <<< "${R1SERVE:-r1serve}"
mkdir -p "$out"
[ -n "${DP_GPUS:-}" ] && export CUDA_VISIBLE_DEVICES=$DP_GPUS
bench=("${r1serve[@]}" bench --url "http://127.0.0.1:$port" --tokenizer "$tok" --num-workers 4 --no-plots --no-progress)

hit_rate() {  # the replicas' summed prefix-cache hits over queries, from their /metrics
  python3 - "$port" "$n" <<'PY'
import re, sys, urllib.request
port, n = int(sys.argv[1]), int(sys.argv[2])
hits = queries = 0.0
for i in range(1, n + 1):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port + i}/metrics", timeout=5).read().decode()
    hits += sum(float(v) for v in re.findall(r"^r1serve_prefix_cache_hits_total(?:\{[^}]*\})? (\S+)", text, re.M))
    queries += sum(float(v) for v in re.findall(r"^r1serve_prefix_cache_queries_total(?:\{[^}]*\})? (\S+)", text, re.M))
print(f"prefix-cache hit rate {hits / max(queries, 1):.3f} ({hits:.0f} / {queries:.0f} tokens)")
PY
}

start() {  # $1: policy; prints the seconds until the front answered /health with 200
  local began=$SECONDS
  "${r1serve[@]}" serve --model "${MODEL:-deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B}" --load-format dummy \
    --tokenizer "$tok" --max-model-len 4096 --no-repetition-guard --port "$port" --data-parallel-size "$n" \
    --router-policy "$1" --log-file "$out/server-$1.log" ${SERVE_ARGS:-} > "$out/server-$1.out" 2>&1 &
  server=$!
  for _ in $(seq 300); do
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null && break
    kill -0 $server 2>/dev/null || { echo "the server exited:"; tail -20 "$out/server-$1.out"; return 1; }
    sleep 1
  done
  echo "== $n replicas, $1: front healthy after $((SECONDS - began)) s"
}

stop() { kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; }
trap stop EXIT

for policy in cache_aware round_robin; do
  start "$policy" || exit 1
  if [ "$policy" = cache_aware ]; then
    "${bench[@]}" --workload random --input-len 100:1024 --output-len 100:1024 --num-prompts $((base * n * scale)) \
      --concurrency $((base * n)) --output "$out/nano.json" | grep -v '^{'
    [ "${DP_LONG:-1}" = 0 ] || "${bench[@]}" --workload random --input-len 1024 --output-len 1024 --num-prompts $((base * n * scale)) \
      --concurrency $((base * n)) --output "$out/1024x1024.json" | grep -v '^{'
  fi
  "${bench[@]}" --workload shared-prefix --num-groups "${DP_GROUPS:-64}" --prefix-len 512 --input-len 16 \
    --output-len 128 --num-prompts $(( ${DP_GROUPS:-64} * ${DP_SAMPLES:-64} )) --concurrency $((base * n)) \
    --output "$out/repeated-$policy.json" | grep -v '^{'
  echo "$policy: $(hit_rate)"
  if [ "$policy" = round_robin ]; then  # one replica's failure, halfway through a run
    (sleep 20; pkill -KILL -f -- "--port $((port + 1)) " ) &
    "${bench[@]}" --workload random --input-len 512 --output-len 256 --num-prompts $((base * n)) \
      --concurrency $((base / 4 * n)) --output "$out/failure.json" | grep -E "failed|errors|output tok"
  fi
  stop
done
