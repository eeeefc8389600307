#!/usr/bin/env bash
# The GPU checks and figures of docs/performance.md, in stages that each fit one device call (10 minutes):
#   bash benchmarks/device_session.sh tests   OUT_DIR   # the gpu-marked tests: kernels vs twins, sampler, engine
#   bash benchmarks/device_session.sh offline OUT_DIR   # ceilings, batch-1 decode, nano, 1,000 x 512/512, transformers
#   bash benchmarks/device_session.sh serving OUT_DIR   # r1serve serve + r1serve bench (needs the wheels, below)
#   bash benchmarks/device_session.sh quant-tests OUT_DIR    # quantized kernels vs twins, engine GPU tests, op times
#   bash benchmarks/device_session.sh dp OUT_DIR       # DP_SIZE replicas behind vllm-router (needs the wheels and
#                                                       # vllm-router's: see dp_sweep.sh), through the front
#   bash benchmarks/device_session.sh quant-offline OUT_DIR  # per weight format and KV dtype: GiB, KV tokens, decode, nano, uniform
#   bash benchmarks/device_session.sh skinny-sweep OUT_DIR   # bf16 skinny tiles: alone at SWEEP_BATCHES (1,2; '' to
#                                                            # skip), then inside the step (STEP_SWEEP "ops rows"
#                                                            # lines); batch-1 decode, committed file against swept
#   bash benchmarks/device_session.sh quant-sweep OUT_DIR    # quantized skinny tiles (QUANT_SWEEP; all at 1, 2 rows):
#                                                            # batch-1 decode per format with the committed file, the
#                                                            # sweep into it (OUT_DIR/quant-*.json), decode again
#   bash benchmarks/device_session.sh decode-merge OUT_DIR   # the decode attention GPU tests, then the step graph
#                                                            # with split decodes merged by the merge kernel against
#                                                            # their last program (DecodeTiles.merge_in_decode)
#   bash benchmarks/device_session.sh structured OUT_DIR     # structured-output GPU tests, then decode and nano with
#                                                            # a JSON schema on every request against none (wants
#                                                            # .carry/tokenizer, as the serving stage does)
# Run from the repository root (the device tool's working directory), e.g. with OUT_DIR=$OUT. Each stage writes
# its log to OUT_DIR/<stage>.log and prints its table last. The serving stage needs the server's packages and the
# real tokenizer, neither of which is on that machine: here, run ../shared/tools/device-wheels, then
# `../shared/tools/device-wheels httpx2 httpcore2 truststore opentelemetry-api fastapi-offline` (what this openai,
# this fastapi and r1serve's /docs need beyond its default list) and
# `mkdir -p .carry && cp -r ../shared/data/tokenizer .carry/`; name .whl and .carry in the call's carry. The tests stage runs only the GPU test files, so it needs neither.
set -euo pipefail
stage=$1; out=$2
mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec > >(tee "$out/$stage.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
if [ -d .whl ]; then  # the server's packages (the tests import them too)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
case $stage in
  tests)
    timeout "${TESTS_TIMEOUT:-560}" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_gpu.py tests/test_sampling_gpu.py tests/test_engine_gpu.py tests/test_structured_gpu.py \
      tests/test_compile_ahead.py ;;
  offline)
    timeout 400 python3 benchmarks/offline.py --model 1.5b --device cuda --workloads decode,batch,nano,uniform \
      --decode-tokens 1024 --batch-tokens 256 --hf decode,nano --hf-decode-tokens 64 --max-model-len 4096
    timeout 170 python3 benchmarks/step_profile.py --batches 1,256 --nano --out "$out/step_profile.json" ;;
  serving)  # then the offline twin of its 256-stream point, for the server's cost as a ratio from one call
    R1SERVE="python3 -m r1serve.cli" RATES=inf CONCURRENCY=1,64,256 SWEEP_PROMPTS=8,256,512 \
      timeout 460 bash benchmarks/serving_sweep.sh "${TOKENIZER:-.carry/tokenizer}" "$out"
    timeout 100 python3 benchmarks/offline.py --model 1.5b --device cuda --workloads serving --hf "" \
      --max-model-len 4096 | grep -v '^{' ;;
  quant-tests)
    timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_quant_kernels_gpu.py || true
    timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_engine_gpu.py || true
    timeout 200 python3 benchmarks/quant_gpu.py ;;
  dp)
    export PATH=/tmp/site/bin:$PATH  # vllm-router's script, installed with the wheels
    R1SERVE="python3 -m r1serve.cli" timeout 580 bash benchmarks/dp_sweep.sh "${TOKENIZER:-.carry/tokenizer}" "$out" ;;
  quant-offline)  # one line per weight format (and fp8 KV): memory, KV tokens, decode vs roofline, nano, uniform
    summary=$out/quant-offline-summary.txt; : > "$summary"
    for run in "none auto decode,nano,uniform" "w4a16 auto decode,nano,uniform" "int8 auto decode,nano,uniform" \
               "fp8 auto decode,nano,uniform" "w8a8 auto decode,nano" "none fp8 decode,nano" "fp8 fp8 decode,nano"; do
      read -r quantization kv workloads <<< "$run"
      flag=(); [ "$quantization" = none ] || flag=(--quantization "$quantization")
      echo "== weights: $quantization, KV cache: $kv"
      timeout "${QUANT_RUN_TIMEOUT:-100}" python3 benchmarks/offline.py --model 1.5b --device cuda --workloads "$workloads" \
        --decode-tokens 1024 --hf "" --max-model-len 4096 --kv-cache-dtype "$kv" "${flag[@]}" > "$out/run.txt" || true
      tail -6 "$out/run.txt"
      tail -1 "$out/run.txt" | python3 benchmarks/offline_summary.py "$quantization" "$kv" >> "$summary" || true
    done
    cat "$summary" ;;
  skinny-sweep)  # this device's skinny file: the products alone at SWEEP_BATCHES, then each "ops rows" pair of
                 # STEP_SWEEP inside the step; batch-1 decode with the committed file and the swept one, twice
    file=src/r1serve/kernels/tuning/skinny-$(python3 -c "import torch; from r1serve.kernels.tuning import \
      device_slug; print(device_slug(torch.cuda.get_device_name()))").json
    cp "$file" /tmp/committed-skinny.json 2>/dev/null || true
    if [ -n "${SWEEP_BATCHES-1,2}" ]; then
      (cd benchmarks && timeout 250 python3 decode_step_gpu.py --ctx 600 --sweep-batches "${SWEEP_BATCHES:-1,2}" \
        | grep -v '^{' | tail -40)
    fi
    while read -r ops rows; do
      (cd benchmarks && timeout 150 python3 decode_step_gpu.py --no-sweep --ctx 600 --step-sweep "$ops" \
        --step-sweep-m "$rows" --write-step-sweep | grep -v '^{')
    done <<< "${STEP_SWEEP:-qkv_proj,o_proj,down_proj 1
qkv_proj,o_proj,down_proj 2}"
    cp "$file" "$out/"
    for table in committed swept committed swept; do
      if [ $table = swept ]; then cp "$out/$(basename "$file")" "$file"; else cp /tmp/committed-skinny.json "$file" \
        2>/dev/null || rm -f "$file"; fi
      echo "== batch-1 decode, $table file"
      timeout 45 python3 benchmarks/offline.py --model 1.5b --device cuda --workloads decode --decode-tokens 1024 \
        --hf "" --max-model-len 4096 | grep 'tok/s'
    done ;;
  quant-sweep)  # each "layouts rows" pair of QUANT_SWEEP merges into this device's file in the checkout
    decode() { for q in w4a16 int8 fp8 w8a8; do echo "== $1, $q"; timeout 50 python3 benchmarks/offline.py --model 1.5b \
      --device cuda --workloads decode --decode-tokens 512 --hf "" --max-model-len 4096 --quantization "$q" | grep 'tok/s'
      done; }
    decode "committed tables"
    while read -r layouts rows; do
      (cd benchmarks && timeout 200 python3 quant_gpu.py --no-table --sweep --sweep-layouts "$layouts" \
        --sweep-rows "$rows" | grep -v '^{')
    done <<< "${QUANT_SWEEP:-int4,int8,fp8 1
int4,int8,fp8 2}"
    cp src/r1serve/kernels/tuning/quant-*.json "$out/"
    decode "after the sweep" ;;
  decode-merge)  # variant 1 of decode_step_gpu.py is the default chain, 8 the same with merge_in_decode on
    timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_gpu.py -k decode || true
    (cd benchmarks && timeout 300 python3 decode_step_gpu.py --no-sweep --ctx 600 --batches 1,2,4,8,16 \
      --max-model-len 4096 --variants 1,8 | grep -v '^{') ;;
  structured)  # the masks over the real vocabulary when .carry/tokenizer is there (see the serving stage)
    tokenizer=(); [ -d "${TOKENIZER:-.carry/tokenizer}" ] && tokenizer=(--tokenizer "${TOKENIZER:-.carry/tokenizer}")
    timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_structured_gpu.py tests/test_engine_gpu.py || true
    timeout 380 python3 benchmarks/offline.py --model 1.5b --device cuda --workloads decode,nano --decode-tokens 1024 \
      --hf "" --max-model-len 4096 --structured json --repeats 3 "${tokenizer[@]}" ;;
  *)
    echo "unknown stage $stage (tests, offline, serving, dp, quant-tests, quant-offline, skinny-sweep, quant-sweep," \
      "decode-merge, structured)" >&2; exit 2 ;;
esac
