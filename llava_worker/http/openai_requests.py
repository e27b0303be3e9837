"""OpenAI chat requests made into the worker's GenerateParams: strict validation (pydantic), refusal of
what this worker does not do, messages for the model's chat template, image URLs checked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llava_worker.config import MAX_NEW_TOKENS_CAP
from llava_worker.errors import InvalidRequestError, plural
from llava_worker.http.remote_images import url_scheme
from llava_worker.protocol import GenerateParams, describe_validation_error, json_object


class RequestError(InvalidRequestError):
    """A request the OpenAI API refuses, with the `param` and `code` of OpenAI's error object."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.code = code
        self.status = status


# 1. The request as it arrives. Strict, so wrong JSON types are refused; unknown fields are ignored,
#    since OpenAI clients send many that do not change what this worker generates.


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ImageURL(_Strict):
    url: str
    detail: str | None = None


class VideoURL(_Strict):
    url: str


class ContentPart(_Strict):
    type: Literal["text", "image_url", "video_url"]
    text: str | None = None
    image_url: ImageURL | None = None
    video_url: VideoURL | None = None

    @model_validator(mode="after")
    def _has_its_field(self) -> ContentPart:
        if getattr(self, self.type) is None:
            raise ValueError(f"a part of type {self.type!r} needs the field {self.type!r}")
        return self


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: list[ContentPart]
    """A string arrives as one text part."""

    @field_validator("content", mode="before")
    @classmethod
    def _string_as_text_part(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [{"type": "text", "text": value}]
        if not isinstance(value, list):
            raise ValueError("must be a string or a list of content parts")
        return value


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ResponseFormat(BaseModel):
    type: str


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    stop: list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # what torch's generators take
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted only with the values that ask for nothing beyond plain text (checked in _refuse_unsupported).
    n: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def _string_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Decodes and validates a body; raises InvalidRequestError (RequestError naming the parameter)."""
    try:
        request = ChatCompletionRequest.model_validate(json_object(body))
    except ValidationError as exc:
        param = ".".join(str(part) for part in exc.errors()[0]["loc"])
        raise RequestError(describe_validation_error(exc), param=param) from None
    _refuse_unsupported(request)
    return request


def _refuse_unsupported(request: ChatCompletionRequest) -> None:
    def refuse(param: str, what: str) -> RequestError:
        return RequestError(f"{what} is not supported by this worker", param=param, code="unsupported_parameter")

    if request.n is not None and request.n > 1:
        raise refuse("n", "n > 1 (several choices per request)")
    for name in ("tools", "tool_choice", "functions", "function_call"):
        if getattr(request, name) is not None:
            raise refuse(name, f"'{name}' (tool and function calling)")
    if request.logprobs or request.top_logprobs is not None:
        raise refuse("logprobs", "'logprobs'")
    if request.response_format is not None and request.response_format.type != "text":
        raise refuse("response_format", f"response_format of type {request.response_format.type!r}")
    if request.logit_bias:
        raise refuse("logit_bias", "'logit_bias'")
    if request.stream_options is not None and not request.stream:
        raise RequestError("'stream_options' is only allowed when 'stream' is true", param="stream_options")


# 2. Request → GenerateParams: the messages for the model's chat template, image URLs in order.


@dataclass(frozen=True)
class ChatContent:
    """A chat in transformers' format, and the URLs of its images and videos in the order they appear."""

    messages: list[dict[str, Any]]
    image_urls: list[str]
    video_urls: list[str]


def chat_messages(request: ChatCompletionRequest, takes_images: bool, takes_videos: bool = False) -> ChatContent:
    """The conversation in transformers' chat format, with its image and video URLs.

    Vision-language templates take content as a list of parts, an image as `{"type": "image"}` and a
    video as `{"type": "video"}`; text-only templates generally expect a string, so the text parts
    are joined.
    """
    messages: list[dict[str, Any]] = []
    images: list[str] = []
    videos: list[str] = []
    for message in request.messages:
        parts: list[dict[str, Any]] = []
        for part in message.content:
            if part.type == "image_url" and part.image_url is not None:
                parts.append({"type": "image"})
                images.append(part.image_url.url)
            elif part.type == "video_url" and part.video_url is not None:
                parts.append({"type": "video"})
                videos.append(part.video_url.url)
            else:
                parts.append({"type": "text", "text": part.text})
        content: Any = parts if takes_images else "\n".join(part["text"] for part in parts if part["type"] == "text")
        # OpenAI's newer name for the system role; templates know only "system".
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": content})
    if images and not takes_images:
        raise RequestError(
            f"this model does not accept images, but the request has {plural(len(images), 'image')}", param="messages"
        )
    if videos and not takes_videos:
        raise RequestError(
            f"this model does not accept videos, but the request has {plural(len(videos), 'video')}", param="messages"
        )
    return ChatContent(messages, images, videos)


def generate_params(
    request: ChatCompletionRequest, prompt: str, images: tuple[str, ...], videos: tuple[str, ...] = ()
) -> GenerateParams:
    """The worker's parameters for `request`, once its prompt is rendered and its images are at hand."""
    return GenerateParams(
        prompt=prompt,
        images=images,
        videos=videos,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        max_new_tokens=request.max_completion_tokens or request.max_tokens or MAX_NEW_TOKENS_CAP,
        stop=tuple(stop for stop in request.stop or () if stop),
        echo=False,
        top_k=0,  # OpenAI samples from the whole distribution (after top_p)
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        seed=request.seed,
    )


# 3. Images: data URLs pass through as they are (the worker decodes them); http(s) URLs are fetched
#    only with --allow-remote-images (remote_images.py).


def check_image_urls(urls: list[str], max_images: int, allow_remote: bool) -> None:
    """Refuses too many images, and URLs this worker does not take, before anything is fetched."""
    if len(urls) > max_images:
        raise RequestError(f"too many images: {len(urls)} given, at most {max_images} accepted", param="messages")
    for index, url in enumerate(urls):
        scheme = url_scheme(url)
        if scheme == "data" or (scheme in ("http", "https") and allow_remote):
            continue
        if scheme in ("http", "https"):
            raise RequestError(
                f"image {index + 1} is a remote URL, and this worker does not fetch images "
                "(send it as a data: URL, or start the worker with --allow-remote-images)",
                param="messages",
                code="remote_images_disabled",
            )
        accepted = "data: and http(s) URLs" if allow_remote else "data: URLs"
        raise RequestError(
            f"image {index + 1} has a URL of scheme {scheme or 'none'!r}; only {accepted} are accepted",
            param="messages",
        )


def check_video_urls(urls: list[str], max_videos: int) -> None:
    """Refuses too many videos, and videos not sent as data: URLs (the worker fetches no video)."""
    if len(urls) > max_videos:
        raise RequestError(f"too many videos: {len(urls)} given, at most {max_videos} accepted", param="messages")
    for index, url in enumerate(urls):
        if url_scheme(url) != "data":
            raise RequestError(
                f"video {index + 1} must be sent as a data: URL (base64); the worker fetches no video",
                param="messages",
            )
