"""ProcessEngine: the engine in a child process behaves as the thread engine does, seen from asyncio."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from r1serve import EngineConfig, SamplingParams
from r1serve.engine.async_engine import AsyncEngine
from r1serve.engine.process_engine import ProcessEngine

GREEDY = SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.0)


@pytest.fixture(scope="module")
def config(tiny_model_dir: Path) -> EngineConfig:
    return EngineConfig(model=str(tiny_model_dir), load_format="dummy", dtype="float32", kv_cache_space=0.05)


@pytest.fixture(scope="module")
def engine(config: EngineConfig):
    eng = ProcessEngine.from_config(config)
    yield eng
    eng.shutdown()


async def run(engine, prompt: list[int], params: SamplingParams) -> tuple[list, str, list[int]]:
    outs = [out async for out in engine.generate(prompt, params)]
    return outs, "".join(o.outputs[0].delta_text for o in outs), outs[-1].outputs[0].token_ids


def test_same_tokens_as_the_thread_engine(engine: ProcessEngine, config: EngineConfig) -> None:
    thread = AsyncEngine.from_config(config)
    try:
        prompts = [[100 + i, 7, 8, 9] for i in range(6)]

        async def both() -> tuple[list, list]:
            a = await asyncio.gather(*(run(engine, p, GREEDY) for p in prompts))
            b = await asyncio.gather(*(run(thread, p, GREEDY) for p in prompts))
            return a, b

        ours, theirs = asyncio.run(both())
    finally:
        thread.shutdown()
    for (outs, joined, ids), (_, ref_joined, ref_ids) in zip(ours, theirs, strict=True):
        assert ids == ref_ids and len(ids) == 10
        assert joined == ref_joined == outs[-1].outputs[0].text
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"


def test_n_samples_and_stats(engine: ProcessEngine) -> None:
    params = SamplingParams(n=3, max_tokens=6, ignore_eos=True, seed=1, top_p=1.0)

    async def main() -> list:
        return [out async for out in engine.generate([5, 6, 7], params)]

    outs = asyncio.run(main())
    final = {c.index: c for out in outs for c in out.outputs}
    assert sorted(final) == [0, 1, 2] and all(len(c.token_ids) == 6 for c in final.values())
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks
    assert stats.num_generation_tokens >= 18


def test_leaving_a_stream_aborts_in_the_child(engine: ProcessEngine) -> None:
    async def main() -> None:
        stream = engine.generate([1, 2, 3], SamplingParams(max_tokens=3000, ignore_eos=True, temperature=0.0))
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(200):
            if engine.stats().num_running == 0:
                return
            await asyncio.sleep(0.02)

    asyncio.run(main())
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks
    assert not engine._requests  # the parent forgot the request when its consumer left


def test_a_slow_consumer_gets_merged_outputs_that_add_up(engine: ProcessEngine) -> None:
    params = SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.0)

    async def main() -> list:
        outs = []
        async for out in engine.generate([9, 8, 7], params):
            outs.append(out)
            await asyncio.sleep(0.05)  # the engine runs ahead: its deltas queue up behind this consumer
        return outs

    outs = asyncio.run(main())
    final = outs[-1].outputs[0]
    assert len(outs) < 40 and outs[-1].finished and final.finish_reason == "length"
    assert "".join(o.outputs[0].delta_text for o in outs) == final.text
    assert [t for o in outs for t in o.outputs[0].delta_token_ids] == final.token_ids and len(final.token_ids) == 40
    assert not engine._requests


def test_merged_deltas_join_each_samples_text_and_ids_in_order() -> None:
    from r1serve.engine.process_engine import _merge_deltas

    deltas = [("r", False, 3, [(0, "a", [1], None, None, [(-1.0, (), ())]), (1, "x", [7], None, None, None)],
               [None, (-4.0, (), ())]),
              ("r", False, 3, [(1, "y", [8], "stop", "</s>", None)], None),
              ("r", True, 3, [(0, "b", [2, 3], "length", None, [(-2.0, (), ()), (-3.0, (), ())])], None)]
    assert _merge_deltas(deltas) == ("r", True, 3, [(0, "ab", [1, 2, 3], "length", None,
                                                      [(-1.0, (), ()), (-2.0, (), ()), (-3.0, (), ())]),
                                                     (1, "xy", [7, 8], "stop", "</s>", None)],
                                     [None, (-4.0, (), ())])
    assert _merge_deltas(deltas[:1]) is deltas[0]


def test_invalid_request_raises_in_the_parent(engine: ProcessEngine) -> None:
    async def main() -> None:
        async for _ in engine.generate([1] * 10_000, SamplingParams()):
            pass

    with pytest.raises(ValueError, match="prompt"):
        asyncio.run(main())


@pytest.mark.slow
def test_shutdown_ends_streams_with_abort(config: EngineConfig) -> None:
    eng = ProcessEngine.from_config(config)

    async def main() -> list:
        outs = []
        async for out in eng.generate([4, 4, 4], SamplingParams(max_tokens=3000, ignore_eos=True, temperature=0.0)):
            outs.append(out)
            if len(outs) == 3:
                await asyncio.get_running_loop().run_in_executor(None, eng.shutdown)
        return outs

    outs = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert not eng._process.is_alive()


def test_loading_failure_is_raised_in_the_parent(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="max_model_len"):
        ProcessEngine.from_config(EngineConfig(model=str(_tiny_copy(tmp_path)), load_format="dummy",
                                               num_kv_blocks=2, max_model_len=4096))


def _tiny_copy(tmp_path: Path) -> Path:
    from conftest import write_model_dir

    return write_model_dir(tmp_path / "tiny", with_tokenizer=False)
