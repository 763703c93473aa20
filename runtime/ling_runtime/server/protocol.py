"""Request bodies of the OpenAI-compatible and SGLang-native APIs, and the OpenAI error body.

Unknown fields are accepted and ignored (clients send many optional ones); fields we read are typed,
so a wrong type is a 400 naming the field.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ling_runtime.engine.sampling import SamplingParams, SamplingParamsError


class APIError(Exception):
    """An error with an HTTP status and an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Loose):
    include_usage: bool = False


class ChatCompletionRequest(_Loose):
    model: str | None = None
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True


class CompletionRequest(_Loose):
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True


class GenerateRequest(_Loose):
    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: dict[str, Any] = Field(default_factory=dict)
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0
    rid: str | None = None


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def openai_sampling(
    req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None, default_max: int
) -> SamplingParams:
    if req.n != 1:
        raise APIError(400, f"n: only 1 is supported, got {req.n}", param="n")
    if isinstance(req, ChatCompletionRequest):
        logprobs = req.logprobs
        top = req.top_logprobs or 0
        if top and not logprobs:
            raise APIError(400, "top_logprobs: requires logprobs=true", param="top_logprobs")
    else:
        logprobs = req.logprobs is not None
        top = req.logprobs or 0
        if req.echo:
            raise APIError(400, "echo: not supported", param="echo")
    params = SamplingParams(
        max_new_tokens=max_tokens if max_tokens is not None else default_max,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if req.top_k is None else req.top_k,
        seed=req.seed,
        stop=_stop_list(req.stop),
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        top_logprobs=top,
        skip_special_tokens=req.skip_special_tokens,
    )
    return params


_SGLANG_KEYS = {
    "max_new_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos",
    "skip_special_tokens": "skip_special_tokens",
    "seed": "seed",
    "sampling_seed": "seed",
}


def sglang_sampling(req: GenerateRequest) -> SamplingParams:
    kwargs: dict[str, Any] = {}
    for key, value in req.sampling_params.items():
        if key not in _SGLANG_KEYS:
            continue  # SGLang has many knobs (penalties, regex, ...); unknown ones are ignored
        kwargs[_SGLANG_KEYS[key]] = value
    if "stop" in kwargs:
        kwargs["stop"] = _stop_list(kwargs["stop"])
    kwargs.setdefault("max_new_tokens", 128)
    kwargs.setdefault("temperature", 1.0)
    try:
        params = SamplingParams(**kwargs, logprobs=req.return_logprob, top_logprobs=req.top_logprobs_num)
    except TypeError as exc:
        raise APIError(400, f"sampling_params: {exc}", param="sampling_params") from exc
    if params.top_k == 0:
        params.top_k = -1  # SGLang treats top_k 0 / -1 as "off"
    for name in ("max_new_tokens", "top_k"):
        if not isinstance(getattr(params, name), int) or isinstance(getattr(params, name), bool):
            raise APIError(
                400, f"sampling_params.{name}: expected an integer", param=f"sampling_params.{name}"
            )
    for name in ("temperature", "top_p"):
        if not isinstance(getattr(params, name), int | float):
            raise APIError(400, f"sampling_params.{name}: expected a number", param=f"sampling_params.{name}")
    return params


def validate_sampling(params: SamplingParams, vocab_size: int, prefix: str = "") -> SamplingParams:
    try:
        return params.validate(vocab_size)
    except SamplingParamsError as exc:
        param = prefix + ("max_new_tokens" if prefix and exc.param == "max_tokens" else exc.param)
        raise APIError(400, f"{param}: {str(exc).split(': ', 1)[1]}", param=param) from exc
