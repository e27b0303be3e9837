"""The batching engine: every request in a shared decode loop gets exactly what `generate` gives it alone."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.support.kinds import KINDS
from tests.support.payloads import PROMPT_1, PROMPT_2, TEXT_PROMPT, encode_image, greedy
from tests.support.reference import reference_text
from tests.support.servers import StreamingClient, wait_until

LONG_TEXT = "USER: Write a long story about a little boat that sails across the sea at night. ASSISTANT:"
SHORT_TEXT = "USER: Hi. ASSISTANT:"


def _cases(kind: str) -> dict[str, tuple[str, list[str]]]:
    """Four requests of different prompt lengths, with and without images where the model takes them."""
    if kind in ("text-only", "sliding-window"):
        return {
            "long": (LONG_TEXT, []),
            "early-stop": (SHORT_TEXT, []),
            "late": (TEXT_PROMPT, []),
            "leaver": ("USER: Count the stars. ASSISTANT:", []),
        }
    size = (64, 40) if kind == "llava-next" else (40, 30)
    return {
        "long": (PROMPT_1, [encode_image(1, size)]),
        "early-stop": (SHORT_TEXT, []),
        "late": (PROMPT_2, [encode_image(2, (30, 70)), encode_image(3)]),
        "leaver": ("USER: <image>\nDescribe it. ASSISTANT:", [encode_image(4)]),
    }


@pytest.mark.parametrize("kind", KINDS)
def test_every_request_in_a_batch_gets_what_generate_gives_it_alone(start_worker, kind):
    # Prompts go in large pieces, so the three first requests are all decoding before the first ends
    # (tests/engine/test_prefill_exactness.py covers small pieces).
    worker = start_worker(kind, limit_model_concurrency=4, prefill_chunk_tokens=256)
    loaded = worker.worker.loaded
    cases = _cases(kind)
    lengths = {"long": 150, "early-stop": 60, "late": 30, "leaver": 150}
    expected = {name: reference_text(loaded, p, imgs, lengths[name]) for name, (p, imgs) in cases.items()}
    # The early leaver stops at a stop string taken from the middle of its own answer.
    early = expected["early-stop"]
    stop = next(early[i : i + 3] for i in range(8, len(early) - 3) if early.find(early[i : i + 3]) == i)
    expected["early-stop"] = early[: early.find(stop)]

    def client(name: str, **extra: Any) -> StreamingClient:
        prompt, images = cases[name]
        return StreamingClient(worker.url, greedy(prompt, images or None, max_new_tokens=lengths[name], **extra))

    long, early_stop, late, leaver = client("long"), client("early-stop", stop=stop), client("late"), client("leaver")
    for started in (long, early_stop, leaver):
        started.start()
    # One request arrives while the others are half-way through.
    wait_until(lambda: len(long.chunks) >= 10, 30, "the first requests to be decoding")
    late.start()
    # One leaves early by disconnecting.
    wait_until(lambda: len(leaver.chunks) >= 5, 30, "the leaver's first chunks")
    leaver.hang_up.set()
    for finished in (long, early_stop, late, leaver):
        finished.join(timeout=120)

    for name, finished in (("long", long), ("early-stop", early_stop), ("late", late)):
        prompt = cases[name][0]
        assert finished.chunks[-1] == {"text": prompt + expected[name], "error_code": 0}, name
    leaver_prompt = cases["leaver"][0]
    assert all((leaver_prompt + expected["leaver"]).startswith(c["text"]) for c in leaver.chunks)
    assert worker.worker.engine.peak_batch >= 3, "the requests should have decoded together"
    wait_until(lambda: worker.status()["queue_length"] == 0, 10, "every slot to come back")


def test_sampled_and_greedy_requests_share_a_batch(start_worker):
    worker = start_worker("text-only", limit_model_concurrency=4)
    loaded = worker.worker.loaded
    greedy_client = StreamingClient(worker.url, greedy(LONG_TEXT, max_new_tokens=80))
    sampled = [
        StreamingClient(worker.url, {"prompt": TEXT_PROMPT, "temperature": 0.9, "top_p": 0.8, "max_new_tokens": 60})
        for _ in range(2)
    ]
    for started in (greedy_client, *sampled):
        started.start()
    for finished in (greedy_client, *sampled):
        finished.join(timeout=60)
    assert greedy_client.chunks[-1]["text"] == LONG_TEXT + reference_text(loaded, LONG_TEXT, [], 80)
    for finished in sampled:
        assert finished.chunks[-1]["error_code"] == 0 and len(finished.chunks[-1]["text"]) > len(TEXT_PROMPT)
    assert worker.worker.engine.peak_batch >= 2


def test_a_cache_that_cannot_be_batched_falls_back_to_one_at_a_time(start_worker, caplog):
    with caplog.at_level(logging.WARNING, logger="llava_worker.engine.core"):
        worker = start_worker("sliding-window", limit_model_concurrency=3)
        loaded = worker.worker.loaded
        cases = _cases("sliding-window")
        clients = {
            name: StreamingClient(worker.url, greedy(prompt, max_new_tokens=40)) for name, (prompt, _) in cases.items()
        }
        for started in clients.values():
            started.start()
        for finished in clients.values():
            finished.join(timeout=60)
    for name, finished in clients.items():
        prompt = cases[name][0]
        assert finished.chunks[-1]["text"] == prompt + reference_text(loaded, prompt, [], 40), name
    assert worker.worker.engine.peak_batch == 1
    assert any("cannot be batched" in record.message for record in caplog.records)


def test_requests_beyond_the_limit_wait_and_then_join(start_worker):
    worker = start_worker("llava-1.5", limit_model_concurrency=2)
    loaded = worker.worker.loaded
    images = [encode_image(5)]
    clients = [StreamingClient(worker.url, greedy(PROMPT_1, images, max_new_tokens=60)) for _ in range(5)]
    for started in clients:
        started.start()
    for finished in clients:
        finished.join(timeout=120)
    expected = PROMPT_1 + reference_text(loaded, PROMPT_1, images, 60)
    assert [c.chunks[-1]["text"] for c in clients] == [expected] * 5
    assert worker.worker.engine.peak_batch == 2


def test_a_kv_token_budget_admits_in_order_what_fits_and_refuses_what_never_could(start_worker):
    """Memory-aware admission on the CPU: with room for one request's prompt and new tokens but not
    two, the two run one after the other, both exact; one that could never fit is refused at once."""
    worker = start_worker("text-only", limit_model_concurrency=4, max_batch_tokens=100)
    loaded = worker.worker.loaded
    prompts = {"sea": TEXT_PROMPT, "hi": SHORT_TEXT}
    for prompt in prompts.values():
        assert len(loaded.tokenizer(prompt)["input_ids"]) + 60 <= 100 < 2 * 60
    clients = {name: StreamingClient(worker.url, greedy(prompt, max_new_tokens=60)) for name, prompt in prompts.items()}
    for client in clients.values():
        client.start()
    for client in clients.values():
        client.join(timeout=60)
    for name, client in clients.items():
        assert client.chunks[-1] == {
            "text": prompts[name] + reference_text(loaded, prompts[name], [], 60),
            "error_code": 0,
        }
    assert worker.worker.engine.peak_batch == 1, "the budget held them to one at a time"
    tokens = len(loaded.tokenizer(SHORT_TEXT)["input_ids"])
    refused = worker.generate(greedy(SHORT_TEXT, max_new_tokens=200))
    assert refused == [
        {
            "text": f"the request needs room for {tokens + 200} tokens ({tokens} of prompt, image tokens included, "
            "and 200 new), more than the 100 the batch may hold (--max-batch-tokens); ask for fewer new tokens "
            "or send a shorter prompt",
            "error_code": 1,
        }
    ]
    wait_until(lambda: worker.status()["queue_length"] == 0, 10, "every slot to come back")
