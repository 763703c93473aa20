"""Request bodies of the OpenAI-compatible and SGLang-native APIs, parsed strictly, and what each asks
of the sampler.

Every field is typed and strict (a string is not an integer, `5` is not a list of stop strings);
a field we do not know, or know and cannot honour, is a 400 "<field>: not supported", never
silently ignored. `parse_body` turns raw bytes into a request type on a worker thread (never on the
event loop): invalid JSON, lone surrogates anywhere, and type errors are 400s naming the field.
Range checks are not made here: `Engine.prepare` makes them once for every route.

max_tokens when a request gives none, one default per route (docs/runtime.md):
- `/v1/chat/completions`: what the context leaves after the prompt, at most `CHAT_MAX_TOKENS`;
- `/v1/completions`: `COMPLETIONS_MAX_TOKENS` (OpenAI's default);
- `/generate`: `GENERATE_MAX_NEW_TOKENS` (SGLang's default).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ling_runtime.engine.sampling import SamplingParams
from ling_runtime.server.errors import APIError, not_supported, validation_error
from ling_runtime.text.grammar import GrammarSpec

CHAT_MAX_TOKENS = 1024
COMPLETIONS_MAX_TOKENS = 16
GENERATE_MAX_NEW_TOKENS = 128


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# ---- shared pieces ------------------------------------------------------------------------------------
class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)] = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


Stop = str | list[str] | None
# OpenAI's logit_bias: token ids as JSON object keys (strings) -> bias.
LogitBias = dict[str, float] | None


class _OpenAIRequest(_Strict):
    """Fields the chat and completions bodies share (OpenAI's, then SGLang/vLLM extensions)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: LogitBias = None
    response_format: ResponseFormat | None = None
    user: str | None = None  # the end user's id (OpenAI: for abuse monitoring); accepted, not used
    # Extensions of SGLang and vLLM.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# ---- /v1/chat/completions -----------------------------------------------------------------------------
class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Strict):
    name: str
    arguments: str


class MessageToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    # What the openai client echoes back from a reply (`messages.append(reply.message)`): accepted
    # while null, so a conversation round-trips; anything else is not supported.
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: text parts joined, tool calls as plain dicts."""
        out: dict[str, Any] = {"role": self.role, "content": self.text}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    @property
    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content


_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class FunctionDef(_Strict):
    name: Annotated[str, Field(pattern=_TOOL_NAME.pattern)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_OpenAIRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    # OpenAI fields this server cannot honour: accepted only when absent or null.
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]

    def template_tools(self) -> list[dict[str, Any]] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None


# ---- /v1/completions ----------------------------------------------------------------------------------
class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


# ---- /generate (SGLang) -------------------------------------------------------------------------------
class GenerateSamplingParams(_Strict):
    """SGLang's `sampling_params`: the knobs this engine honours (others are a 400)."""

    max_new_tokens: int = GENERATE_MAX_NEW_TOKENS
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: Stop = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logit_bias: LogitBias = None
    seed: int | None = None
    sampling_seed: int | None = None
    n: int = 1
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None


class GenerateRequest(_Strict):
    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: GenerateSamplingParams = Field(default_factory=GenerateSamplingParams)
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int | None = None
    rid: str | None = None


# ---- parsing --------------------------------------------------------------------------------------
T = TypeVar("T", bound=BaseModel)
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_body(raw: bytes, model: type[T]) -> T:
    """Raw request bytes -> `model`; a 400 naming the field for anything else (run off the loop)."""
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise APIError(400, "body: not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise APIError(
            400, f"body: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    if not isinstance(data, dict):
        raise APIError(400, "body: expected a JSON object")
    where = lone_surrogate(data)
    if where is not None:
        raise APIError(
            400, f"{where}: contains a lone UTF-16 surrogate (not valid Unicode text)", param=where
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None


def lone_surrogate(obj: Any, path: str = "") -> str | None:
    """The path of the first string (or key) holding a lone surrogate, which JSON's `\\ud800` escapes
    can carry but no tokenizer or UTF-8 encoder takes; None when there is none."""
    stack: list[tuple[Any, str]] = [(obj, path)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return where or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                sub = f"{where}.{key}" if where else str(key)
                if _SURROGATE.search(key):
                    return sub
                stack.append((item, sub))
        elif isinstance(value, list):
            stack.extend((item, f"{where}.{i}") for i, item in enumerate(value))
    return None


# ---- what each route asks of the sampler --------------------------------------------------------------
def stop_list(stop: Stop) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def logit_bias(bias: LogitBias, param: str = "logit_bias") -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            out[int(key)] = float(value)
        except ValueError:
            raise APIError(400, f"{param}: keys must be token ids, got {key!r}", param=param) from None
    return out


def reject_unsupported(body: BaseModel, names: tuple[str, ...]) -> None:
    """A 400 for each field this server cannot honour that the request set (not null)."""
    for name in names:
        if getattr(body, name) is not None:
            raise not_supported(name)


def _one_choice(req: _OpenAIRequest) -> None:
    if req.n is not None and req.n != 1:
        raise APIError(400, f"n: only 1 is supported, got {req.n}", param="n")


def _openai_sampling(
    req: _OpenAIRequest, max_tokens: int, logprobs: bool, top_logprobs: int
) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if req.top_k is None else req.top_k,
        min_p=req.min_p or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=logit_bias(req.logit_bias),
        min_new_tokens=req.min_tokens or 0,
        seed=req.seed,
        stop=stop_list(req.stop),
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        skip_special_tokens=req.skip_special_tokens,
    )


def response_format_grammar(fmt: ResponseFormat | None) -> tuple[GrammarSpec, str] | None:
    """The grammar a `response_format` asks for and the field to name when it does not compile."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec("json_object"), "response_format"
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(
            400,
            "response_format.json_schema.schema: required for type json_schema",
            param="response_format.json_schema.schema",
        )
    return GrammarSpec(
        "json_schema", json.dumps(fmt.json_schema.schema_)
    ), "response_format.json_schema.schema"


CHAT_UNSUPPORTED = (
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
    "functions",
    "function_call",
)


def chat_sampling(req: ChatCompletionRequest, prompt_tokens: int, context_length: int) -> SamplingParams:
    _one_choice(req)
    reject_unsupported(req, CHAT_UNSUPPORTED)
    if req.modalities is not None and req.modalities != ["text"]:
        raise not_supported("modalities", 'only ["text"] is supported')
    if req.store:
        raise not_supported("store", "this server stores no completions")
    if req.service_tier not in (None, "auto", "default"):
        raise not_supported("service_tier")
    for i, m in enumerate(req.messages):
        for name in ("refusal", "annotations", "audio", "function_call"):
            if getattr(m, name) is not None:
                raise not_supported(f"messages.{i}.{name}")
    top = req.top_logprobs or 0
    if top and not req.logprobs:
        raise APIError(400, "top_logprobs: requires logprobs=true", param="top_logprobs")
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is None:
        max_tokens = max(1, min(CHAT_MAX_TOKENS, context_length - prompt_tokens))
    return _openai_sampling(req, max_tokens, bool(req.logprobs), top)


def completion_sampling(req: CompletionRequest) -> SamplingParams:
    _one_choice(req)
    if req.echo:
        raise not_supported("echo")
    if req.best_of not in (None, 1):
        raise APIError(400, f"best_of: only 1 is supported, got {req.best_of}", param="best_of")
    if req.suffix is not None:
        raise not_supported("suffix")
    max_tokens = COMPLETIONS_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    return _openai_sampling(req, max_tokens, req.logprobs is not None, req.logprobs or 0)


def generate_sampling(req: GenerateRequest) -> SamplingParams:
    sp = req.sampling_params
    if sp.n != 1:
        raise APIError(400, f"sampling_params.n: only 1 is supported, got {sp.n}", param="sampling_params.n")
    if req.logprob_start_len not in (None, -1):
        raise not_supported("logprob_start_len", "only -1 (logprobs of the output) is supported")
    if sp.seed is not None and sp.sampling_seed is not None:
        raise APIError(400, "sampling_params.seed: give seed or sampling_seed", param="sampling_params.seed")
    return SamplingParams(
        max_new_tokens=sp.max_new_tokens,
        min_new_tokens=sp.min_new_tokens,
        temperature=sp.temperature,
        top_p=sp.top_p,
        # SGLang treats top_k 0 / -1 as "off".
        top_k=-1 if sp.top_k == 0 else sp.top_k,
        min_p=sp.min_p,
        frequency_penalty=sp.frequency_penalty,
        presence_penalty=sp.presence_penalty,
        repetition_penalty=sp.repetition_penalty,
        logit_bias=logit_bias(sp.logit_bias, "sampling_params.logit_bias"),
        seed=sp.seed if sp.seed is not None else sp.sampling_seed,
        stop=stop_list(sp.stop),
        stop_token_ids=list(sp.stop_token_ids or []),
        ignore_eos=sp.ignore_eos,
        skip_special_tokens=sp.skip_special_tokens,
        logprobs=req.return_logprob,
        top_logprobs=req.top_logprobs_num,
    )


def generate_grammar(req: GenerateRequest) -> tuple[GrammarSpec, str] | None:
    """SGLang's constrained decoding: at most one of json_schema, regex, ebnf."""
    sp = req.sampling_params
    given = [
        (k, v) for k, v in (("json_schema", sp.json_schema), ("regex", sp.regex), ("ebnf", sp.ebnf)) if v
    ]
    if len(given) > 1:
        names = ", ".join(f"sampling_params.{k}" for k, _ in given)
        raise APIError(400, f"{names}: give one of them", param=f"sampling_params.{given[1][0]}")
    if not given:
        return None
    kind, source = given[0]
    return GrammarSpec(kind, source), f"sampling_params.{kind}"  # type: ignore[arg-type]
