"""FastChat compatibility: the worker behind FastChat's real OpenAI-compatible API server, and the
FastChat additions to the worker protocol (`/worker_generate`, `/count_token`, `/model_details`,
`/worker_get_conv_template`, `echo`, `usage`/`finish_reason`, stop lists, `stop_token_ids`, `top_k`,
presence/frequency penalties).

Everything is real and on loopback: FastChat's controller and `fastchat.serve.openai_api_server` run
as subprocesses, the workers serve tiny random-weight checkpoints over HTTP, and the client is the
official `openai` package. Expected answers are what `model.generate` gives greedily for the prompt
FastChat builds, computed here.

FastChat 0.2.36 streams with `chunk.json(exclude_unset=True, ensure_ascii=False)`, which pydantic 2
refuses (lm-sys/FastChat#3067, #3140; fixed in FastChat after 0.2.36): every streamed answer dies
with `TypeError: dumps_kwargs ...` whatever the worker does. The API server is therefore started with
a small shim that gives pydantic 2's `BaseModel.json` the `ensure_ascii` argument back (the
`json.dumps(chunk.dict(...), ensure_ascii=False)` workaround given in #3067); FastChat's own code
runs unchanged.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
import torch
from fastchat.conversation import Conversation, SeparatorStyle, get_conv_template
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from llava_worker.config import WorkerConfig
from llava_worker.models.loaded import LoadedModel
from llava_worker.worker import ModelWorker
from tests.support.payloads import PROMPT_1, TEXT_PROMPT, encode_image, greedy
from tests.support.reference import reference_text, reference_tokens
from tests.support.servers import Controller, ModelCache, RunningWorker, free_port, wait_until

#: Tokens asked for in the API tests; every answer below runs to this limit ("length").
MAX_TOKENS = 12
#: LLaVA-1.5's system message (its `conv_llava_v1`), written out here rather than taken from the worker.
LLAVA_SYSTEM_MESSAGE = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TEXT_MODEL = "tiny-text-only"
LLAVA_MODEL = "tiny-llava-1.5"

#: Runs FastChat's API server module as `python -m` would, after restoring `ensure_ascii` (see above).
API_SERVER_SHIM = """
import json, runpy, pydantic
if pydantic.VERSION.startswith("2."):
    def _json(self, *, ensure_ascii=True, **kwargs):
        return json.dumps(self.model_dump(mode="json", **kwargs), ensure_ascii=ensure_ascii)
    pydantic.BaseModel.json = _json
runpy.run_module("fastchat.serve.openai_api_server", run_name="__main__", alter_sys=True)
"""


# ---------------------------------------------------------------------------------------------------
# The stack: controller + API server + two registered workers, started once for this module.


@dataclass
class FastChatStack:
    controller: Controller
    api_url: str
    client: openai.OpenAI
    text: RunningWorker
    llava: RunningWorker


class ApiServer:
    """FastChat's `openai_api_server` as a subprocess on 127.0.0.1 (its log files go into `workdir`)."""

    def __init__(self, workdir: Path, controller_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"openai-api-server-{self.port}.out"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    API_SERVER_SHIM,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--controller-address",
                    controller_url,
                ],
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def lists(self, models: set[str]) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the API server exited with {self.process.returncode}:\n{self.log_tail()}")
        try:
            answer = requests.get(self.url + "/v1/models", timeout=5)
        except requests.RequestException:
            return False
        return answer.ok and models <= {card["id"] for card in answer.json()["data"]}

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


def serve(checkpoints: dict[str, Path], models: ModelCache, kind: str, **settings: Any) -> RunningWorker:
    """What conftest's `start_worker` does, for a module-scoped worker."""
    port = free_port()
    base = WorkerConfig(model_path=str(checkpoints[kind]), device="cpu", worker_address=f"http://127.0.0.1:{port}")
    config = replace(base, **settings)
    return RunningWorker(ModelWorker(config, models.get(config)), port).start()


@pytest.fixture(scope="module")
def stack(
    checkpoints: dict[str, Path], models: ModelCache, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FastChatStack]:
    workdir = tmp_path_factory.mktemp("fastchat")
    controller = Controller(workdir).start()
    api = ApiServer(workdir, controller.url)  # starts while the workers load
    workers: list[RunningWorker] = []
    try:
        for kind in ("text-only", "llava-1.5"):
            workers.append(
                serve(
                    checkpoints,
                    models,
                    kind,
                    no_register=False,
                    controller_address=controller.url,
                    heartbeat_interval=0.5,
                )
            )
        wait_until(lambda: api.lists({TEXT_MODEL, LLAVA_MODEL}), 60, "the API server to list both models", 0.2)
        client = openai.OpenAI(base_url=api.url + "/v1", api_key="x", timeout=60, max_retries=0)
        yield FastChatStack(controller, api.url, client, workers[0], workers[1])
    finally:
        for worker in workers:
            worker.stop()
        api.stop()
        controller.stop()


# ---------------------------------------------------------------------------------------------------
# Helpers


def llava_prompt(user: str, system: str = LLAVA_SYSTEM_MESSAGE) -> str:
    """LLaVA-1.5's one-turn prompt, written out by hand (FastChat builds it from our template)."""
    return f"{system} USER: {user} ASSISTANT:"


def data_url(encoded: str) -> str:
    return "data:image/png;base64," + encoded


def image_message(text: str, encoded: str) -> dict[str, Any]:
    """An OpenAI user message with a text part and an image part (a data URL)."""
    return {
        "role": "user",
        "content": [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": data_url(encoded)}},
        ],
    }


def prompt_tokens(loaded: LoadedModel, prompt: str, images: list[str]) -> int:
    """Tokens the prompt takes of the context, image tokens included (what `usage` must report)."""
    if loaded.processor is None:
        return len(loaded.tokenizer(prompt)["input_ids"])
    pil = [Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB") for data in images]
    encoded = loaded.processor(text=[prompt], images=pil or None, return_tensors="pt")
    return int(encoded["input_ids"].shape[-1])


def decode(loaded: LoadedModel, tokens: list[int]) -> str:
    return str(loaded.tokenizer.decode(tokens, skip_special_tokens=True))


def eos_ids(loaded: LoadedModel) -> set[int]:
    configured = loaded.model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return {int(i) for i in ids if i is not None}


def full_length_reference(loaded: LoadedModel, prompt: str, images: list[str], n: int) -> list[int]:
    """The greedy reference, checked to run to `n` tokens without an end-of-sequence token."""
    tokens = reference_tokens(loaded, prompt, images, n)
    assert len(tokens) == n and not eos_ids(loaded) & set(tokens), "the reference ends early: pick another prompt"
    return tokens


def chat(client: openai.OpenAI, model: str, messages: Any, **options: Any) -> Any:
    """A chat completion, greedy unless `temperature` is given."""
    options.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=messages, **options)


def chat_stream(client: openai.OpenAI, model: str, messages: Any, **options: Any) -> tuple[str, list[Any]]:
    """Joined content of a streamed chat completion, and its chunks."""
    chunks = list(chat(client, model, messages, stream=True, **options))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    return content, chunks


def assert_finishes_once(chunks: list[Any], reason: str) -> None:
    """Only the last chunk carries a finish reason, and it is `reason`."""
    reasons = [chunk.choices[0].finish_reason for chunk in chunks]
    assert reasons[-1] == reason, reasons
    assert all(r is None for r in reasons[:-1]), reasons


def post_json(url: str, path: str, body: Any = None) -> requests.Response:
    return requests.post(url + path, json=body, timeout=60)


def stream_raw(url: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
    with requests.post(url + "/worker_generate_stream", json=payload, stream=True, timeout=60) as r:
        assert r.status_code == 200, r.text
        return [json.loads(chunk) for chunk in r.iter_lines(delimiter=b"\0") if chunk]


def two_stop_strings(full: str, start: int) -> tuple[str, str]:
    """Two 3-character pieces of `full`, each first found where it is taken from; the second later."""

    def first_found_at(index: int) -> str | None:
        piece = full[index : index + 3]
        return piece if len(piece) == 3 and full.find(piece) == index else None

    early = next(piece for i in range(start, len(full)) if (piece := first_found_at(i)))
    late = next(piece for i in range(full.find(early) + 6, len(full)) if (piece := first_found_at(i)))
    return early, late


def stop_string_cut(loaded: LoadedModel, tokens: list[int], stops: list[str]) -> tuple[str, int]:
    """Text up to the first of `stops`, and the tokens generated until it appeared."""
    full = decode(loaded, tokens)
    cut = min(index for stop in stops if (index := full.find(stop)) >= 0)
    needed = next(n for n in range(1, len(tokens) + 1) if any(stop in decode(loaded, tokens[:n]) for stop in stops))
    return full[:cut], needed


# ---------------------------------------------------------------------------------------------------
# Through FastChat's OpenAI-compatible API server


@pytest.mark.subprocess
def test_models_are_listed_and_the_llava_worker_registers_as_multimodal(stack):
    assert [model.id for model in stack.client.models.list().data] == [LLAVA_MODEL, TEXT_MODEL]
    controller = stack.controller.url
    assert post_json(controller, "/list_multimodal_models").json() == {"models": [LLAVA_MODEL]}
    assert post_json(controller, "/list_language_models").json() == {"models": [TEXT_MODEL]}


@pytest.mark.subprocess
def test_text_chat_equals_greedy_generation_streamed_or_not(stack):
    loaded = stack.text.worker.loaded
    question = "Tell me a story about the sea."
    prompt = llava_prompt(question)
    expected = decode(loaded, full_length_reference(loaded, prompt, [], MAX_TOKENS))
    messages = [{"role": "user", "content": question}]

    answer = chat(stack.client, TEXT_MODEL, messages, max_tokens=MAX_TOKENS)
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "length"
    count = prompt_tokens(loaded, prompt, [])
    assert answer.usage.model_dump(exclude_none=True) == {
        "prompt_tokens": count,
        "completion_tokens": MAX_TOKENS,
        "total_tokens": count + MAX_TOKENS,
    }

    # The same prompt sent straight to the worker, with the parameters FastChat sends, agrees.
    direct = post_json(
        stack.text.url,
        "/worker_generate",
        greedy(prompt, max_new_tokens=MAX_TOKENS, echo=False, top_k=-1, stop=[], stop_token_ids=None, logprobs=None),
    ).json()
    assert direct["text"] == expected and direct["usage"] == answer.usage.model_dump(exclude_none=True)

    content, chunks = chat_stream(stack.client, TEXT_MODEL, messages, max_tokens=MAX_TOKENS)
    assert content == expected
    assert len(chunks) > 3  # really streamed, token by token
    assert_finishes_once(chunks, "length")


@pytest.mark.subprocess
def test_chat_with_an_image_equals_greedy_generation_streamed_or_not(stack):
    loaded = stack.llava.worker.loaded
    image = encode_image(7)
    question = "What is in the picture?"
    # FastChat puts "$$<image>$$" before the text; the worker reads it as LLaVA's "<image>\n".
    prompt = llava_prompt("<image>\n" + question)
    expected = decode(loaded, full_length_reference(loaded, prompt, [image], MAX_TOKENS))
    messages = [image_message(question, image)]

    answer = chat(stack.client, LLAVA_MODEL, messages, max_tokens=MAX_TOKENS)
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "length"
    count = prompt_tokens(loaded, prompt, [image])
    assert count > len(loaded.tokenizer(prompt)["input_ids"])  # the image tokens are counted
    assert answer.usage.model_dump(exclude_none=True) == {
        "prompt_tokens": count,
        "completion_tokens": MAX_TOKENS,
        "total_tokens": count + MAX_TOKENS,
    }

    # What FastChat sends the worker: its own placeholder and the image as the data URL it was given.
    fastchat_prompt = llava_prompt("$$<image>$$" + question)
    direct = post_json(
        stack.llava.url,
        "/worker_generate",
        greedy(fastchat_prompt, [data_url(image)], max_new_tokens=MAX_TOKENS, echo=False, top_k=-1, stop=[]),
    ).json()
    assert direct["text"] == expected

    content, chunks = chat_stream(stack.client, LLAVA_MODEL, messages, max_tokens=MAX_TOKENS)
    assert content == expected
    assert_finishes_once(chunks, "length")

    # Another image, another answer: the image really travels through FastChat.
    other = encode_image(8)
    reply = chat(stack.client, LLAVA_MODEL, [image_message(question, other)], max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == reference_text(loaded, prompt, [other], MAX_TOKENS) != expected


@pytest.mark.subprocess
def test_system_message_and_history_build_llava_multi_turn_prompt(stack):
    loaded = stack.text.worker.loaded
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Hi there."},
        {"role": "assistant", "content": "Hello, friend."},
        {"role": "user", "content": "Tell me more."},
    ]
    prompt = "You answer briefly. USER: Hi there. ASSISTANT: Hello, friend.</s>USER: Tell me more. ASSISTANT:"
    answer = chat(stack.client, TEXT_MODEL, messages, max_tokens=MAX_TOKENS)
    assert answer.choices[0].message.content == reference_text(loaded, prompt, [], MAX_TOKENS)
    assert answer.usage.prompt_tokens == prompt_tokens(loaded, prompt, [])


@pytest.mark.subprocess
def test_stop_strings_from_the_request_end_the_answer(stack):
    loaded = stack.text.worker.loaded
    question = "Tell me a story about the sea."
    prompt = llava_prompt(question)
    tokens = full_length_reference(loaded, prompt, [], 30)
    full = decode(loaded, tokens)
    # Two stop strings taken from the answer; the one listed first occurs later.
    early, late = two_stop_strings(full, 8)
    messages = [{"role": "user", "content": question}]

    for stop in ([late, early], late):
        expected, needed = stop_string_cut(loaded, tokens, [stop] if isinstance(stop, str) else stop)
        answer = chat(stack.client, TEXT_MODEL, messages, max_tokens=30, stop=stop)
        assert answer.choices[0].message.content == expected, stop
        assert answer.choices[0].finish_reason == "stop"
        # Generation ended at the token that completed the stop string.
        assert answer.usage.completion_tokens == needed < 30

        content, chunks = chat_stream(stack.client, TEXT_MODEL, messages, max_tokens=30, stop=stop)
        assert content == expected
        assert_finishes_once(chunks, "stop")


@pytest.mark.subprocess
def test_completions_with_and_without_echo(stack):
    loaded = stack.text.worker.loaded
    prompt = "Once upon a time"  # /v1/completions sends the prompt as it is, with no template
    expected = decode(loaded, full_length_reference(loaded, prompt, [], MAX_TOKENS))
    count = prompt_tokens(loaded, prompt, [])
    for echo in (False, True):
        answer = stack.client.completions.create(
            model=TEXT_MODEL, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS, echo=echo
        )
        assert answer.choices[0].text == (prompt if echo else "") + expected
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage is not None
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (count, MAX_TOKENS)

        stream = stack.client.completions.create(
            model=TEXT_MODEL, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS, echo=echo, stream=True
        )
        chunks = list(stream)
        assert "".join(chunk.choices[0].text for chunk in chunks) == (prompt if echo else "") + expected
        assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.subprocess
def test_fastchat_refuses_a_prompt_longer_than_the_context_from_our_token_count(stack):
    loaded = stack.text.worker.loaded
    question = "sea " * 150
    count = prompt_tokens(loaded, llava_prompt(question), [])
    assert count > 512
    with pytest.raises(openai.BadRequestError) as refused:
        chat(stack.client, TEXT_MODEL, [{"role": "user", "content": question}])
    message = str(refused.value)
    assert "maximum context length is 512 tokens" in message and f"resulted in {count} tokens" in message


@pytest.mark.subprocess
def test_a_worker_error_reaches_the_api_client(stack):
    messages = [image_message("What is this?", encode_image(1))]
    with pytest.raises(openai.BadRequestError, match="this model does not accept images"):
        chat(stack.client, TEXT_MODEL, messages, max_tokens=4)


@pytest.mark.subprocess
def test_sampling_parameters_openai_allows_reach_the_worker(stack):
    loaded = stack.text.worker.loaded
    question = "Tell me a story about the sea."
    expected = reference_text(loaded, llava_prompt(question), [], MAX_TOKENS)
    messages = [{"role": "user", "content": question}]
    # top_p 0 (valid for OpenAI and FastChat) keeps only the most likely token: greedy, even when sampling.
    answer = chat(stack.client, TEXT_MODEL, messages, max_tokens=MAX_TOKENS, top_p=0, temperature=1.0)
    assert answer.choices[0].message.content == expected
    completion = stack.client.completions.create(
        model=TEXT_MODEL, prompt=llava_prompt(question), temperature=1.0, top_p=0, max_tokens=MAX_TOKENS
    )
    assert completion.choices[0].text == expected
    # Penalties beyond OpenAI's range (FastChat does not check them) are refused with the worker's reason.
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        chat(stack.client, TEXT_MODEL, messages, max_tokens=MAX_TOKENS, presence_penalty=2.5)
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        stack.client.completions.create(model=TEXT_MODEL, prompt="Hi", max_tokens=4, frequency_penalty=-3)


# ---------------------------------------------------------------------------------------------------
# The protocol, straight to the worker


def test_worker_generate_is_the_last_chunk_with_usage_and_finish_reason(start_worker):
    worker = start_worker("llava-1.5")
    loaded = worker.worker.loaded
    images = [encode_image(1)]
    expected = reference_text(loaded, PROMPT_1, images, MAX_TOKENS)
    count = prompt_tokens(loaded, PROMPT_1, images)
    usage = {"prompt_tokens": count, "completion_tokens": MAX_TOKENS, "total_tokens": count + MAX_TOKENS}
    for echo, text in ((False, expected), (True, PROMPT_1 + expected), (None, PROMPT_1 + expected)):
        payload = greedy(PROMPT_1, images, max_new_tokens=MAX_TOKENS)
        if echo is not None:
            payload["echo"] = echo
        answer = post_json(worker.url, "/worker_generate", payload)
        assert answer.status_code == 200
        assert answer.json() == {"text": text, "error_code": 0, "usage": usage, "finish_reason": "length"}, echo

    refused = post_json(worker.url, "/worker_generate", greedy(PROMPT_1, [], echo=False))
    assert refused.json()["error_code"] != 0 and "placeholder" in refused.json()["text"]


def test_stream_chunks_carry_usage_and_finish_reason_only_when_echo_is_sent(start_worker):
    worker = start_worker("text-only")
    loaded = worker.worker.loaded
    tokens = full_length_reference(loaded, TEXT_PROMPT, [], MAX_TOKENS)
    count = prompt_tokens(loaded, TEXT_PROMPT, [])

    for echo in (False, True):
        chunks = stream_raw(worker.url, greedy(TEXT_PROMPT, max_new_tokens=MAX_TOKENS, echo=echo))
        assert all(set(chunk) == {"text", "error_code", "usage", "finish_reason"} for chunk in chunks)
        assert [chunk["finish_reason"] for chunk in chunks] == [None] * (len(chunks) - 1) + ["length"]
        assert [chunk["usage"]["completion_tokens"] for chunk in chunks] == list(range(1, MAX_TOKENS + 1))
        for chunk in chunks:
            n = chunk["usage"]["completion_tokens"]
            assert chunk["usage"] == {"prompt_tokens": count, "completion_tokens": n, "total_tokens": count + n}
            assert chunk["text"] == (TEXT_PROMPT if echo else "") + decode(loaded, tokens[:n])

    # A stop string: the last chunk says "stop".
    stop = two_stop_strings(decode(loaded, tokens), 6)[0]
    chunks = stream_raw(worker.url, greedy(TEXT_PROMPT, max_new_tokens=MAX_TOKENS, echo=False, stop=[stop]))
    assert chunks[-1]["finish_reason"] == "stop"
    assert chunks[-1]["text"] == stop_string_cut(loaded, tokens, [stop])[0]

    # LLaVA's clients send no `echo`: they get exactly the original's chunks.
    chunks = stream_raw(worker.url, greedy(TEXT_PROMPT, max_new_tokens=MAX_TOKENS))
    assert all(set(chunk) == {"text", "error_code"} for chunk in chunks)
    assert chunks[-1] == {"text": TEXT_PROMPT + decode(loaded, tokens), "error_code": 0}


def test_stop_as_a_list_ends_at_whichever_comes_first(start_worker):
    worker = start_worker("llava-1.5")
    loaded = worker.worker.loaded
    images = [encode_image(1)]
    tokens = full_length_reference(loaded, PROMPT_1, images, 30)
    full = decode(loaded, tokens)
    early, late = two_stop_strings(full, 8)
    for stops in ([late, early], [early, late], [late, "never appears"]):
        expected, needed = stop_string_cut(loaded, tokens, stops)
        answer = post_json(
            worker.url, "/worker_generate", greedy(PROMPT_1, images, max_new_tokens=30, echo=False, stop=stops)
        ).json()
        assert (answer["text"], answer["finish_reason"]) == (expected, "stop"), stops
        assert answer["usage"]["completion_tokens"] == needed
        chunks = worker.generate(greedy(PROMPT_1, images, max_new_tokens=30, stop=stops))
        assert chunks[-1] == {"text": PROMPT_1 + expected, "error_code": 0}


def test_stop_token_ids_end_generation_right_before_that_token(start_worker):
    worker = start_worker("text-only")
    loaded = worker.worker.loaded
    tokens = full_length_reference(loaded, TEXT_PROMPT, [], 30)
    # A token whose first appearance is well into the answer.
    index = next(i for i in range(4, len(tokens)) if tokens[i] not in tokens[:i])
    payload = greedy(TEXT_PROMPT, max_new_tokens=30, echo=False, stop_token_ids=[tokens[index]])
    answer = post_json(worker.url, "/worker_generate", payload).json()
    assert answer["text"] == decode(loaded, tokens[:index])
    assert answer["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] == index
    chunks = stream_raw(worker.url, payload)
    assert chunks[-1]["text"] == decode(loaded, tokens[:index]) and chunks[-1]["finish_reason"] == "stop"


def test_top_k_minus_one_means_no_top_k(start_worker, monkeypatch):
    worker = start_worker("text-only")
    loaded = worker.worker.loaded
    greedy_answer = post_json(
        worker.url, "/worker_generate", greedy(TEXT_PROMPT, max_new_tokens=MAX_TOKENS, top_k=-1)
    ).json()
    assert greedy_answer["error_code"] == 0
    assert greedy_answer["text"] == TEXT_PROMPT + reference_text(loaded, TEXT_PROMPT, [], MAX_TOKENS)

    # As for a model whose generation config sets top_k (the tiny ones set none): a request that
    # names no top_k gets it, FastChat's -1 ("off") must not.
    monkeypatch.setattr(worker.worker.engine, "default_top_k", 5)

    def sampled(top_k: int | None) -> str:
        body = {"prompt": TEXT_PROMPT, "temperature": 2.0, "seed": 1234, "max_new_tokens": 20, "echo": False}
        if top_k is not None:
            body["top_k"] = top_k
        answer = post_json(worker.url, "/worker_generate", body).json()
        assert answer["error_code"] == 0, answer
        text: str = answer["text"]
        return text

    # -1 samples exactly as 0 (no filter) does, for the same seed; the model's top_k would differ.
    assert sampled(-1) == sampled(0) != sampled(None) == sampled(5)
    refused = post_json(worker.url, "/worker_generate", greedy(TEXT_PROMPT, top_k=-2))
    assert refused.json()["error_code"] == 1 and "'top_k'" in refused.json()["text"]


def test_top_p_zero_keeps_only_the_most_likely_token(start_worker):
    worker = start_worker("text-only")
    loaded = worker.worker.loaded
    expected = reference_text(loaded, TEXT_PROMPT, [], 20)
    for seed in (1, 2):
        body = {
            "prompt": TEXT_PROMPT,
            "temperature": 1.0,
            "top_p": 0,
            "seed": seed,
            "max_new_tokens": 20,
            "echo": False,
        }
        answer = post_json(worker.url, "/worker_generate", body).json()
        assert (answer["error_code"], answer["text"]) == (0, expected)
    body = {"prompt": TEXT_PROMPT, "temperature": 1.0, "seed": 1, "max_new_tokens": 20, "echo": False}
    assert post_json(worker.url, "/worker_generate", body).json()["text"] != expected  # it really samples


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence/frequency penalties over the generated tokens, for `model.generate`."""

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        penalised = scores.clone()
        for row in range(scores.shape[0]):
            generated = input_ids[row, self.prompt_length :]
            if generated.numel() == 0:
                continue
            counts = torch.bincount(generated, minlength=scores.shape[-1])[: scores.shape[-1]].to(scores.dtype)
            penalised[row] = scores[row] - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)
        return penalised  # type: ignore[return-value]


def penalised_reference(loaded: LoadedModel, prompt: str, n: int, presence: float, frequency: float) -> str:
    inputs = loaded.tokenizer(prompt, return_tensors="pt")
    processor = OpenAIPenalties(inputs["input_ids"].shape[1], presence, frequency)
    model: Any = loaded.model
    with torch.inference_mode():
        output = model.generate(
            **inputs, do_sample=False, max_new_tokens=n, logits_processor=LogitsProcessorList([processor])
        )
    return decode(loaded, output[0, inputs["input_ids"].shape[1] :].tolist())


def test_presence_and_frequency_penalties_change_greedy_output(start_worker):
    worker = start_worker("text-only")
    loaded = worker.worker.loaded
    prompt = llava_prompt("Hello there, tell me a story.")
    n = 40
    tokens = full_length_reference(loaded, prompt, [], n)
    assert len(set(tokens)) < len(tokens)  # the plain greedy answer repeats tokens
    answers = {}
    for presence, frequency in ((0.3, 0.0), (0.0, 0.3), (0.3, 0.3), (1.2, 0.0)):
        body = greedy(prompt, max_new_tokens=n, echo=False, presence_penalty=presence, frequency_penalty=frequency)
        answer = post_json(worker.url, "/worker_generate", body).json()
        assert answer["text"] == penalised_reference(loaded, prompt, n, presence, frequency), (presence, frequency)
        assert answer["text"] != decode(loaded, tokens)
        answers[presence, frequency] = answer["text"]
    # Presence counts a token once, frequency every time: on this prompt they give different answers.
    assert len({answers[0.3, 0.0], answers[0.0, 0.3], answers[0.3, 0.3]}) == 3


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [2.5, -2.5])
def test_penalties_out_of_range_are_refused(start_worker, field, value):
    worker = start_worker("text-only")
    payload = greedy(TEXT_PROMPT, max_new_tokens=2)
    payload[field] = value
    # FastChat reads /worker_generate's body only from a 200 answer, as its own workers give.
    refused = post_json(worker.url, "/worker_generate", payload)
    assert refused.status_code == 200
    assert refused.json()["error_code"] == 1 and f"'{field}'" in refused.json()["text"]
    stream = post_json(worker.url, "/worker_generate_stream", payload)
    assert stream.status_code == 400
    chunks = [json.loads(chunk) for chunk in stream.content.split(b"\0") if chunk]
    assert len(chunks) == 1 and chunks[0]["error_code"] == 1 and f"'{field}'" in chunks[0]["text"]
    # The limits themselves are accepted.
    payload[field] = 2.0 if value > 0 else -2.0
    assert post_json(worker.url, "/worker_generate", payload).json()["error_code"] == 0


def test_count_token_counts_the_prompt_as_the_tokenizer_does(start_worker):
    for kind, prompt in (("text-only", TEXT_PROMPT), ("llava-1.5", llava_prompt("Describe the picture."))):
        worker = start_worker(kind)
        answer = post_json(worker.url, "/count_token", {"model": "m", "prompt": prompt})
        expected = len(worker.worker.loaded.tokenizer(prompt)["input_ids"])
        assert answer.json() == {"count": expected, "error_code": 0}
    refused = post_json(worker.url, "/count_token", {"model": "m"})
    assert refused.status_code == 400 and refused.json()["error_code"] != 0


@pytest.mark.parametrize("kind", ["llava-1.5", "llava-next", "text-only", "sliding-window"])
def test_model_details_gives_the_context_length(start_worker, kind):
    worker = start_worker(kind)
    assert post_json(worker.url, "/model_details", {"model": "m"}).json() == {"context_length": 512}


@pytest.mark.parametrize(
    ("kind", "fastchat_name"),
    [
        ("llava-1.5", "vicuna_v1.1"),
        ("llava-next", "vicuna_v1.1"),
        ("text-only", "vicuna_v1.1"),
        ("sliding-window", "mistral"),
    ],
)
def test_conv_template_is_one_fastchat_accepts(start_worker, kind, fastchat_name):
    worker = start_worker(kind)
    conv = post_json(worker.url, "/worker_get_conv_template", {"model": "m"}).json()["conv"]
    # Exactly as FastChat's API server builds it.
    template = Conversation(**{**conv, "sep_style": SeparatorStyle(conv["sep_style"])})
    reference = get_conv_template(fastchat_name)
    # The same prompt format as FastChat's own template for the model family.
    assert list(template.roles) == list(reference.roles)
    for field in ("system_template", "offset", "sep_style", "sep", "sep2", "stop_str", "stop_token_ids"):
        assert getattr(template, field) == getattr(reference, field), field
    if fastchat_name != "vicuna_v1.1":
        return
    # LLaVA-1.5's own system message (which says "human" where Vicuna's says "user").
    assert template.system_message == LLAVA_SYSTEM_MESSAGE
    template.append_message(template.roles[0], "Hi.")
    template.append_message(template.roles[1], None)
    assert template.get_prompt() == llava_prompt("Hi.")


@pytest.mark.parametrize(
    ("kind", "name", "system"),
    [
        ("llava-next-llama3", "llama-3", ""),
        ("llava-next-chatml", "chatml_direct", "Answer the questions."),
        ("llava-interleave", "qwen-7b-chat", "You are a helpful assistant."),
    ],
)
def test_each_family_gets_the_fastchat_template_of_its_own_chat_template(start_worker, kind, name, system):
    """FastChat's API server renders what the checkpoint's own chat template renders, and stops where
    the model ends its turn."""
    worker = start_worker(kind)
    conv = post_json(worker.url, "/worker_get_conv_template", {"model": "m"}).json()["conv"]
    assert conv["name"] == name and conv["system_message"] == system
    template = Conversation(**{**conv, "sep_style": SeparatorStyle(conv["sep_style"])})
    template.set_system_message("Be brief.")
    template.append_message(template.roles[0], "Hi there.")
    template.append_message(template.roles[1], "Hello!")
    template.append_message(template.roles[0], "What is the sea?")
    template.append_message(template.roles[1], None)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is the sea?"},
    ]
    loaded = worker.worker.loaded
    own = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert template.get_prompt() == own
    end_of_turn = conv["stop_str"]
    assert loaded.tokenizer.convert_tokens_to_ids(end_of_turn) in conv["stop_token_ids"]
    assert loaded.tokenizer.eos_token_id in conv["stop_token_ids"]
