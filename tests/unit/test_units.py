"""Unit tests of the pure parts: the admission gate, the wire codec (text accumulation: test_detokenizer.py)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from llava_worker.admission import AdmissionGate
from llava_worker.errors import InvalidRequestError
from llava_worker.host_memory import IdleTrimmer
from llava_worker.logs import RepeatLimit
from llava_worker.protocol import encode_chunk, parse_generate_params, worker_status


def test_gate_admits_in_arrival_order_and_counts():
    async def scenario() -> None:
        gate = AdmissionGate(2)
        first, second = await gate.acquire(), await gate.acquire()
        order: list[int] = []

        async def wait(n: int) -> None:
            slot = await gate.acquire()
            order.append(n)
            await asyncio.sleep(0)
            slot.release()

        waiters = [asyncio.create_task(wait(n)) for n in range(4)]
        await asyncio.sleep(0.01)
        assert (gate.running, gate.waiting, gate.queue_length) == (2, 4, 6)
        waiters[1].cancel()  # a client that gives up its place in line
        await asyncio.sleep(0.01)
        assert gate.queue_length == 5
        first.release()
        first.release()  # idempotent
        await asyncio.gather(*waiters, return_exceptions=True)
        assert order == [0, 2, 3]
        second.release()
        assert (gate.running, gate.waiting) == (0, 0)

    asyncio.run(scenario())


def test_chunks_are_encoded_as_the_original_does():
    assert encode_chunk("héllo", 0) == b'{"text": "h\\u00e9llo", "error_code": 0}\x00'
    assert json.loads(encode_chunk("x", 1)[:-1]) == {"text": "x", "error_code": 1}
    assert worker_status("m", 3) == {"model_names": ["m"], "speed": 1, "queue_length": 3}


def test_parameters_have_the_originals_defaults_and_stop_may_be_a_list():
    params = parse_generate_params(b'{"prompt": "hi"}')
    assert (params.temperature, params.top_p, params.max_new_tokens, params.stop, params.images) == (
        1.0,
        1.0,
        256,
        (),
        (),
    )
    assert not params.greedy
    assert parse_generate_params(b'{"prompt": "hi", "temperature": 0.001}').greedy
    assert parse_generate_params(b'{"prompt": "hi", "stop": ["a", "b"]}').stop == ("a", "b")
    assert parse_generate_params(b'{"prompt": "hi", "temperature": 1}').temperature == 1.0


@pytest.mark.parametrize(
    "body", [b'{"prompt": 3}', b'{"prompt": "x", "max_new_tokens": 2.5}', b'{"prompt": "x", "max_new_tokens": true}']
)
def test_wrong_json_types_are_refused(body):
    with pytest.raises(InvalidRequestError):
        parse_generate_params(body)


def test_repeat_limit_passes_a_few_lines_of_a_kind_per_window_then_counts_the_rest():
    now = [0.0]
    limit = RepeatLimit(repeats=3, window=10.0, clock=lambda: now[0])
    logger = logging.getLogger("tests.repeat_limit")

    def record(message: str, *args: object) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.ERROR, __file__, 1, message, args, None)

    passed = [r for r in (record("accept failed: %s", n) for n in range(1000)) if limit.filter(r)]
    assert [r.getMessage() for r in passed[:2]] == ["accept failed: 0", "accept failed: 1"]
    assert len(passed) == 3 and "more like this are dropped" in passed[2].getMessage()
    assert limit.filter(record("another kind of line"))  # kinds have their own allowance
    info = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "request %s: stop", ("x",), None)
    assert all(limit.filter(info) for _ in range(100)), "one line per request is what the log is for"
    now[0] = 10.5
    first = record("accept failed: %s", "again")
    assert limit.filter(first)
    assert first.getMessage() == "accept failed: again [997 more like this were dropped in the previous 10 s]"


def test_idle_trimmer_gives_memory_back_only_after_a_quiet_moment(monkeypatch):
    trims: list[int] = []

    def trim() -> bool:
        trims.append(1)
        return True

    monkeypatch.setattr("llava_worker.host_memory.trim", trim)
    busy = [True]

    async def scenario() -> IdleTrimmer:
        trimmer = IdleTrimmer(lambda: not busy[0], delay=0.05)
        trimmer.poke()  # work ended, but other work still runs: no trim
        await asyncio.sleep(0.15)
        assert trims == []
        busy[0] = False
        trimmer.poke()
        trimmer.poke()  # pokes close together make one trim
        await asyncio.sleep(0.02)
        assert trims == [], "not before the delay"
        await asyncio.sleep(0.2)
        return trimmer

    trimmer = asyncio.run(scenario())
    assert trims == [1] and trimmer.trims == 1
