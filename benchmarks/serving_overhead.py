"""What serving costs the host per streamed token, with the model stubbed out: the ceiling the Python sets.

    python benchmarks/serving_overhead.py --concurrency 256 --num-prompts 512 --output-len 256 \
        [--tokenizer ../shared/data/tokenizer] [--no-engine-process] [--stream-interval N] [--profile]

The server is the real one (FastAPI app, usage rules, reasoning split, SSE, uvicorn) over the real `ProcessEngine`,
whose child steps the real scheduler, detokenizer and outputs around a stubbed forward pass and sampler
(`host_overhead.stubbed_engine`: `engine.fake_runner.FakeRunner`). A light client in another process opens the chat
streams over raw sockets and counts their events without parsing them. Printed: output tokens/s, and CPU time per
streamed token of the server process (event loop, engine reader thread) and of the engine's child. On a GPU the
forward pass adds device time, which overlaps this host time; the tokens/s here is what the host alone allows on
this CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import multiprocessing as mp
import os
import pstats
import resource
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_overhead import stubbed_engine, tiny_model_folder  # noqa: E402

from r1serve.server import ServerSettings, create_app  # noqa: E402

MODEL = "DeepSeek-R1-Distill-Qwen-1.5B"


def client_main(port: int, concurrency: int, num_prompts: int, output_len: int, results: mp.Queue) -> None:
    """The load: `num_prompts` chat streams, `concurrency` at a time; reports (seconds, events, bytes)."""
    results.put(asyncio.run(_load(port, concurrency, num_prompts, output_len)))


async def _load(port: int, concurrency: int, num_prompts: int, output_len: int) -> tuple[float, int, int]:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Count the primes below 100."}],
                       "stream": True, "max_tokens": output_len, "ignore_eos": True}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    todo = iter(range(num_prompts))
    counts = [0, 0]

    async def worker() -> None:
        for _ in todo:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            tail = b""  # shorter than b"data:", so an event is counted in the read where it ends
            while chunk := await reader.read(65536):
                counts[0] += (tail + chunk).count(b"data:")
                counts[1] += len(chunk)
                tail = chunk[-4:]
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, counts[0], counts[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def build_app(args: argparse.Namespace) -> tuple[object, object, int]:
    """The app over an engine whose model is stubbed out; returns (app, engine, the engine child's pid or 0)."""
    from r1serve.engine.async_engine import AsyncEngine
    from r1serve.engine.process_engine import ProcessEngine

    settings = ServerSettings(
        model=str(tiny_model_folder()), served_model_name=[MODEL], tokenizer=args.tokenizer, load_format="dummy",
        device="cpu", dtype="float32", max_num_seqs=args.concurrency, max_model_len=args.output_len + 512,
        kv_cache_space=1.0, access_log=False, log_level="warning", repetition_guard=False,
        stream_interval=args.stream_interval)
    config = settings.engine_config()
    if args.engine_process:
        engine = ProcessEngine(config, stubbed_engine)
        return create_app(engine, settings), engine, engine._process.pid or 0
    engine = AsyncEngine(stubbed_engine(config))
    return create_app(engine, settings), engine, 0


def drive(server: uvicorn.Server, port: int, child_pid: int, args: argparse.Namespace, report: dict) -> None:
    """Waits for the server, runs the client process, measures, then stops the server."""
    while not server.started:
        time.sleep(0.05)
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    client = ctx.Process(target=client_main, args=(port, args.concurrency, args.num_prompts, args.output_len,
                                                   results))
    server_cpu, child_cpu = resource.getrusage(resource.RUSAGE_SELF), cpu_seconds(child_pid) if child_pid else 0.0
    client.start()
    seconds, events, num_bytes = results.get()
    client.join()
    after = resource.getrusage(resource.RUSAGE_SELF)
    report.update(seconds=seconds, events=events, bytes=num_bytes,
                  server_cpu_s=after.ru_utime + after.ru_stime - server_cpu.ru_utime - server_cpu.ru_stime,
                  child_cpu_s=(cpu_seconds(child_pid) - child_cpu) if child_pid else 0.0)
    server.should_exit = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the byte-level fallback)")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--stream-interval", type=int, default=1, help="as `r1serve serve --stream-interval`")
    parser.add_argument("--loop", default="auto", help="uvicorn's event loop: auto, asyncio, uvloop")
    parser.add_argument("--http", default="auto", help="uvicorn's HTTP protocol: auto, h11, httptools")
    parser.add_argument("--profile", action="store_true", help="profile the event loop's thread (its CPU time)")
    args = parser.parse_args()
    app, engine, child_pid = build_app(args)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", loop=args.loop,
                            http=args.http)
    server = uvicorn.Server(config)
    report: dict = {}
    threading.Thread(target=drive, args=(server, port, child_pid, args, report), daemon=True).start()
    # the thread's CPU clock, not the wall: on a small machine the wall time of a socket send or an epoll wait is
    # mostly the other processes running (client, engine child), which is not this loop's cost
    profiler = cProfile.Profile(time.thread_time) if args.profile else None
    if profiler:
        profiler.enable()
    server.run(sockets=[sock])
    if profiler:
        profiler.disable()
    engine.shutdown()  # type: ignore[attr-defined]
    print_report(args, config, report)
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


def print_report(args: argparse.Namespace, config: uvicorn.Config, report: dict) -> None:
    tokens = args.num_prompts * args.output_len
    per_token = {k: report[k] / tokens * 1e6 for k in ("server_cpu_s", "child_cpu_s")}
    mode = "engine process" if args.engine_process else "engine thread"
    print(f"{args.num_prompts} streams x {args.output_len} tokens, concurrency {args.concurrency}, {mode}, "
          f"stream interval {args.stream_interval}, "
          f"loop {config.loop}, http {config.http}: {tokens / report['seconds']:,.0f} output tokens/s "
          f"({report['events']:,} events in {report['seconds']:.2f} s); CPU per token: server "
          f"{per_token['server_cpu_s']:.1f} us, engine child {per_token['child_cpu_s']:.1f} us")
    print(json.dumps({"concurrency": args.concurrency, "num_prompts": args.num_prompts,
                      "output_len": args.output_len, "engine_process": args.engine_process,
                      "stream_interval": args.stream_interval, "loop": config.loop,
                      "http": config.http, "tokenizer": args.tokenizer,
                      "output_tokens_per_s": tokens / report["seconds"],
                      "server_cpu_us_per_token": per_token["server_cpu_s"],
                      "child_cpu_us_per_token": per_token["child_cpu_s"], **report}))


if __name__ == "__main__":
    main()
