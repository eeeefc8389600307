"""AsyncEngine: streams from an asyncio loop while the engine runs on its own thread; aborts free blocks."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from r1serve import AsyncEngine, EngineConfig, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    eng = AsyncEngine.from_config(EngineConfig(model=str(tiny_model_dir), load_format="dummy", dtype="float32",
                                               kv_cache_space=0.05))
    yield eng
    eng.shutdown()


async def collect(engine: AsyncEngine, prompt: list[int], params: SamplingParams) -> tuple[str, list, str]:
    deltas, last = [], None
    async for out in engine.generate(prompt, params):
        deltas.append(out.outputs[0].delta_text)
        last = out
    assert last is not None and last.finished
    return "".join(deltas), last.outputs[0].token_ids, last.outputs[0].text


def test_concurrent_streams_complete_with_consistent_deltas(engine: AsyncEngine) -> None:
    params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0)

    async def main() -> list:
        return await asyncio.gather(*(collect(engine, [100 + i, 7, 8], params) for i in range(16)))

    results = asyncio.run(main())
    assert all(len(ids) == 12 and joined == text for joined, ids, text in results)
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks


def test_leaving_a_stream_aborts_and_frees_blocks(engine: AsyncEngine) -> None:
    async def main() -> None:
        stream = engine.generate([1, 2, 3] * 20, SamplingParams(max_tokens=500, ignore_eos=True, temperature=0.0))
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(100):  # the abort reaches the engine thread asynchronously
            if engine.stats().num_running == 0:
                break
            await asyncio.sleep(0.02)

    asyncio.run(main())
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_total_blocks


def test_cancelled_task_aborts_its_request(engine: AsyncEngine) -> None:
    async def main() -> None:
        async def consume() -> None:
            async for _ in engine.generate([5, 6, 7], SamplingParams(max_tokens=2000, ignore_eos=True,
                                                                     temperature=0.0)):
                pass
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if engine.stats().num_running == 0:
                break
            await asyncio.sleep(0.02)

    asyncio.run(main())
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


def test_invalid_request_raises_before_streaming(engine: AsyncEngine) -> None:
    async def main() -> None:
        async for _ in engine.generate([1] * 10_000, SamplingParams()):
            pass

    with pytest.raises(ValueError, match="prompt"):
        asyncio.run(main())


def test_abort_delivers_a_final_output_to_the_waiting_stream(engine: AsyncEngine) -> None:
    async def main() -> list:
        outs = []
        async for out in engine.generate([9, 8, 7], SamplingParams(max_tokens=3000, ignore_eos=True,
                                                                  temperature=0.0), request_id="to-abort"):
            outs.append(out)
            if len(outs) == 2:
                await engine.abort("to-abort")
        return outs

    outs = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"


def test_outputs_queued_behind_a_slow_consumer_arrive_merged_then_the_error() -> None:
    """A consumer that fell behind gets one output for all that is queued (deltas joined in order), and an error
    queued after them only once those are delivered."""
    from r1serve.engine.frontend import Stream
    from r1serve.outputs import CompletionOutput, RequestOutput

    def out(text: str, finished: bool = False) -> RequestOutput:
        sample = CompletionOutput(0, text, [], None, None, text, [ord(text[0])])
        return RequestOutput("r", None, [1], [sample], finished)

    async def main() -> list:
        stream = Stream(asyncio.get_running_loop())
        got: list = []
        for item in [out("a"), out("b"), out("c"), RuntimeError("engine died"), out("late")]:
            stream.put(item)
        got.append(await stream.next_output())
        with pytest.raises(RuntimeError, match="engine died"):
            await stream.next_output()
        got.append(await stream.next_output())
        for item in [out("d"), out("e", finished=True), out("after the end")]:
            stream.put(item)
        got.append(await stream.next_output())  # merging stops at the finished output
        return got

    got = asyncio.run(main())
    assert [(o.outputs[0].delta_text, o.outputs[0].delta_token_ids, o.finished) for o in got] == [
        ("abc", [97, 98, 99], False), ("late", [108], False), ("de", [100, 101], True)]


def test_a_waiting_consumer_wakes_on_a_put_from_another_thread_and_a_cancelled_wait_leaves_no_waiter() -> None:
    from r1serve.engine.frontend import Stream
    from r1serve.outputs import CompletionOutput, RequestOutput

    def out(text: str) -> RequestOutput:
        return RequestOutput("r", None, [1], [CompletionOutput(0, text, [], None, None, text, [ord(text)])], False)

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        stream = Stream(loop)
        task = asyncio.create_task(stream.next_output())
        await asyncio.sleep(0)
        assert stream.waiter is not None and not task.done()  # waiting for the engine
        threading.Thread(target=loop.call_soon_threadsafe, args=(stream.put, out("x"))).start()
        got = [(await asyncio.wait_for(task, 10)).outputs[0].delta_text]
        assert stream.waiter is None
        waiting = asyncio.create_task(stream.next_output())
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert stream.waiter is None
        stream.put(out("y"))  # nobody waits: it is kept for the next call
        got.append((await stream.next_output()).outputs[0].delta_text)
        return got

    assert asyncio.run(main()) == ["x", "y"]
