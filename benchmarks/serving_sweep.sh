#!/usr/bin/env bash
# The serving sweep: r1serve serve (1.5B dummy weights, real tokenizer) measured by r1serve bench.
#   usage: benchmarks/serving_sweep.sh TOKENIZER_DIR OUT_DIR
# Runs the two documented commands of docs/bench.md against one server, then stops it (SIGTERM).
# Environment: SERVE_ARGS (extra server flags, e.g. --no-engine-process), RATES, CONCURRENCY, SWEEP_PROMPTS, PROMPTS_512.
set -euo pipefail
tok=$1; out=$2; port=${PORT:-8000}
read -r -a r1serve <<< "${R1SERVE:-r1serve}"   # e.g. R1SERVE="python3 -m r1serve.cli" where it is not installed
mkdir -p "$out"
"${r1serve[@]}" serve --model "${MODEL:-deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B}" --load-format dummy --tokenizer "$tok" --max-model-len 4096 --no-repetition-guard \
  --port "$port" --log-file "$out/server.log" ${SERVE_ARGS:-} > "$out/server.out" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 180); do
  python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null && break
  kill -0 $server 2>/dev/null || { echo "the server exited before it was healthy:"; tail -30 "$out/server.out"; exit 1; }
  sleep 1
done
grep -m1 "startup complete" "$out/server.log" || tail -5 "$out/server.out"
bench=("${r1serve[@]}" bench --url "http://127.0.0.1:$port" --tokenizer "$tok" --workload random --num-workers 4)
"${bench[@]}" --input-len 512 --output-len 128 --num-prompts "${PROMPTS_512:-500}" --request-rate "${RATES:-inf,16}" --num-warmups 8 \
  --output "$out/512x128.json" | grep -v '^{'
"${bench[@]}" --input-len 1024 --output-len 1024 --concurrency "${CONCURRENCY:-1,16,64,256}" --num-prompts "${SWEEP_PROMPTS:-16,64,256,1024}" \
  --num-warmups 4 --output "$out/1024x1024.json" | grep -v '^{'
