"""Workloads: prompt text of a target token length, length distributions, arrivals, the agent trace.

Everything here is pure and deterministic given a seed: each purpose draws from its own
`random.Random(f"{seed}/{purpose}")` stream (string seeds hash the same in every process), so
changing the arrival rate never changes the prompts and vice versa.

Token lengths are the server's: a `Calibration` maps text to the prompt tokens the server reports
(`usage.prompt_tokens`), either exactly (a local tokenizer.json that agrees with the server) or by a
linear fit of two probe requests (any server, any tokenizer). Prompt text is random words from a
fixed list, so a prompt's length in tokens is smooth in its length in characters.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Common English words: real tokenizers map most to one token, byte-level ones to a few bytes each.
WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        """
    the of and to in is was for on that with as by at from his her they this are be had not but
    have which one were all their when there been more would can who into time some them other
    than its only then also could many may new these two first any after most over such where
    most made people years way could state system world work between under city during number
    water part used long while well house three both each those high small large country great
    point found place still same since school around another home family early name government
    against history order without later point program several group river area public best result
    service local example power light market music report energy season value table model level
    paper field court party child data design policy method travel window garden letter planet
    signal market forest engine bridge camera silver yellow purple orange animal winter summer
    autumn spring island mountain ocean desert valley harbor station village castle library museum
    theater stadium airport hospital factory kitchen bedroom balcony corridor network protocol
    server client request response latency throughput memory storage compute kernel thread process
    cluster replica gateway router packet header payload buffer stream socket query index cache
    token vector matrix tensor layer weight gradient sample batch epoch metric score budget
    account invoice payment ticket order customer product review rating search filter sort page
    record update delete create insert select commit branch merge build deploy release version
    """.split()  # noqa: SIM905 (a word list reads better as text)
    )
)


def rng_for(seed: int | str, purpose: str) -> random.Random:
    """An independent deterministic stream per purpose (prompts, lengths, arrivals, ...)."""
    return random.Random(f"{seed}/{purpose}")


def random_lengths(rng: random.Random, n: int, length: int, range_ratio: float) -> list[int]:
    """`n` lengths uniform in [max(1, length * range_ratio), length] (SGLang's `--random-range-ratio`)."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"range_ratio must be in [0, 1], got {range_ratio}")
    low = max(1, int(length * range_ratio))
    return [rng.randint(low, length) for _ in range(n)]


def poisson_arrivals(rng: random.Random, n: int, rate: float) -> list[float]:
    """Send offsets in seconds from the start: exponential gaps of mean 1/rate; rate inf: all at 0."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    out, t = [], 0.0
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def words(rng: random.Random, n_chars: int) -> str:
    """Random words, space-separated, exactly `n_chars` characters long (the last word may be cut)."""
    if n_chars <= 0:
        return ""
    parts: list[str] = []
    size = -1
    while size < n_chars:
        w = rng.choice(WORDS)
        parts.append(w)
        size += len(w) + 1
    return " ".join(parts)[:n_chars]


@dataclass
class Calibration:
    """How the server counts prompt tokens.

    `overhead`: tokens the server adds around one prompt (chat template, BOS) on this endpoint.
    `tokens_per_char`: the slope for word text. `count`: an exact counter (a tokenizer that agrees
    with the server) or None. `method`: tokenizer | linear | heuristic (no usable probe answer).
    """

    method: str
    tokens_per_char: float
    overhead: int
    count: Callable[[str], int] | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def estimate(self, text: str) -> int:
        if self.count is not None:
            return self.count(text)
        return round(len(text) * self.tokens_per_char)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "tokens_per_char": round(self.tokens_per_char, 5),
            "overhead_tokens": self.overhead,
            **self.detail,
        }


def fit_from_probes(
    short: tuple[int, int], long: tuple[int, int], count: Callable[[str], int] | None = None, texts=None
) -> Calibration:
    """Calibration from two probes `(chars, server prompt_tokens)` of word text.

    With `count` (a local tokenizer) and the probe `texts`, the tokenizer is used when the server's
    overhead (prompt_tokens minus the tokenizer's count) is the same for both probes within one
    token (a token may merge across the template boundary); otherwise the linear fit is used.
    """
    (c1, p1), (c2, p2) = short, long
    if c2 <= c1:
        raise ValueError("the long probe must have more characters than the short one")
    slope = (p2 - p1) / (c2 - c1)
    if count is not None and texts is not None:
        o1, o2 = p1 - count(texts[0]), p2 - count(texts[1])
        if abs(o1 - o2) <= 1:
            n2 = count(texts[1])
            return Calibration("tokenizer", n2 / max(1, c2), o2, count, {"probe_overheads": [o1, o2]})
        detail = {"tokenizer_disagrees": {"probe_overheads": [o1, o2]}}
    else:
        detail = {}
    overhead = max(0, round(p1 - slope * c1))
    return Calibration("linear", slope, overhead, None, {"probes": [[c1, p1], [c2, p2]], **detail})


HEURISTIC = Calibration("heuristic", 0.25, 0, None, {"note": "no probe answer: assumed 4 characters a token"})


def fit_text(rng: random.Random, tokens: int, cal: Calibration, prefix: str = "") -> str:
    """Word text such that `prefix + text` counts as `tokens` tokens: exact with a tokenizer (up to
    a token that merges across a boundary), else estimated. Returns the text without the prefix."""
    if prefix:
        tokens -= cal.estimate(prefix) if cal.count is None else 0
    if tokens <= 0 and cal.count is None:
        return ""
    n_chars = max(1, round(tokens / cal.tokens_per_char))
    if cal.count is None:
        return words(rng, n_chars)
    count = cal.count

    def total(text: str) -> int:
        return count(prefix + text)

    if total("") >= tokens:
        return ""
    # Exact: take a generous text, then binary-search the longest prefix with <= tokens tokens.
    # Token counts of prefixes are monotone for byte-level and BPE tokenizers on word text.
    text = words(rng, int(n_chars * 1.5) + 16)
    while total(text) < tokens:
        text += " " + words(rng, n_chars)
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total(text[:mid]) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


# ---- datasets -----------------------------------------------------------------------------------
@dataclass
class PromptSpec:
    """One request of a single-turn workload: the prompt text and the output length asked for."""

    index: int
    text: str
    target_prompt_tokens: int
    output_len: int


def single_turn_prompts(
    seed: int | str,
    n: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    cal: Calibration,
    shared_prefix_len: int = 0,
) -> list[PromptSpec]:
    """`random` (range_ratio < 1) or `fixed` (range_ratio 1) prompts of `input_len` server tokens.

    Every prompt differs from its first word (the prefix cache never helps) unless
    `shared_prefix_len` > 0: then all share that many leading tokens, as SGLang's
    generated-shared-prefix dataset does.
    """
    in_lens = random_lengths(rng_for(seed, "input-lengths"), n, input_len, range_ratio)
    out_lens = random_lengths(rng_for(seed, "output-lengths"), n, output_len, range_ratio)
    text_rng = rng_for(seed, "prompts")
    prefix = (
        fit_text(rng_for(seed, "shared-prefix"), shared_prefix_len, cal) + " " if shared_prefix_len else ""
    )
    specs = []
    for i, (n_in, n_out) in enumerate(zip(in_lens, out_lens, strict=True)):
        body = fit_text(text_rng, max(1, n_in - cal.overhead), cal, prefix)
        specs.append(PromptSpec(i, prefix + body, n_in, n_out))
    return specs


# ---- the multi-turn agent trace -----------------------------------------------------------------
@dataclass
class AgentSession:
    """One agent: its task, and for each turn but the last the tool it calls and the tool's answer."""

    index: int
    task: str
    calls: list[tuple[str, str]]  # (tool name, arguments JSON) per turn
    tool_results: list[str]


@dataclass
class AgentTrace:
    """N sessions sharing a system prompt and tool definitions, each of `turns` turns."""

    system: str
    tools: list[dict[str, Any]]
    sessions: list[AgentSession]
    turns: int

    def messages(self, session: int, replies: list[str], tool_role: str = "tool") -> list[dict[str, Any]]:
        """The conversation sent at turn len(replies): system, task, then per past turn the
        assistant's reply with its tool call and the tool's result, as an agent loop appends them.

        `tool_role` "user" is for servers whose chat template has no tool role.
        """
        s = self.sessions[session]
        msgs: list[dict[str, Any]] = [
            {"role": "system", "content": self.system},
            {"role": "user", "content": s.task},
        ]
        for t, reply in enumerate(replies):
            name, arguments = s.calls[t]
            call_id = f"call_{session}_{t}"
            if tool_role == "tool":
                msgs.append(
                    {
                        "role": "assistant",
                        "content": reply,
                        "tool_calls": [
                            {
                                "id": call_id,
                                "type": "function",
                                "function": {"name": name, "arguments": arguments},
                            }
                        ],
                    }
                )
                msgs.append({"role": "tool", "tool_call_id": call_id, "content": s.tool_results[t]})
            else:
                msgs.append({"role": "assistant", "content": f"{reply}\n[call {name} {arguments}]"})
                msgs.append({"role": "user", "content": f"[result of {name}]\n{s.tool_results[t]}"})
        return msgs


def _tool(rng: random.Random, i: int, description: str) -> dict[str, Any]:
    name = f"{rng.choice(WORDS)}_{rng.choice(WORDS)}_{i}"
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": f"what to {rng.choice(WORDS)}"},
                    "limit": {"type": "integer", "description": "maximum number of results"},
                },
                "required": ["query"],
            },
        },
    }


def agent_trace(
    seed: int,
    sessions: int,
    turns: int,
    shared_len: int,
    task_len: int,
    tool_result_len: int,
    cal: Calibration,
    n_tools: int = 8,
    tools_fraction: float = 0.5,
) -> AgentTrace:
    """The trace: a system prompt plus up to `n_tools` tool definitions, about `shared_len` tokens in
    all (`tools_fraction` of it in the tools; fewer tools when their JSON alone would not fit), then
    per session a task of `task_len` tokens and, per turn but the last, a tool call and a tool
    result of [tool_result_len / 2, tool_result_len] tokens."""
    if sessions < 1 or turns < 1:
        raise ValueError("sessions and turns must be >= 1")
    rng = rng_for(seed, "agent-shared")
    tools = []
    if n_tools:
        # A definition costs its JSON skeleton plus its description; with a byte-level tokenizer the
        # skeleton alone is ~200 tokens, so fewer tools fit: keep at least 16 description tokens each.
        skeleton = cal.estimate(json.dumps(_tool(random.Random(0), 0, "")))
        budget = shared_len * tools_fraction
        n_tools = max(1, min(n_tools, int(budget // (skeleton + 16))))
        per_tool = max(1, round(budget / n_tools) - skeleton)
        tools = [_tool(rng, i, fit_text(rng, per_tool, cal)) for i in range(n_tools)]
    tools_tokens = sum(cal.estimate(json.dumps(t)) for t in tools)
    system = fit_text(rng, max(1, shared_len - tools_tokens - cal.overhead), cal)
    task_rng = rng_for(seed, "agent-tasks")
    result_rng = rng_for(seed, "agent-tool-results")
    len_rng = rng_for(seed, "agent-lengths")
    out = []
    for s in range(sessions):
        task = fit_text(task_rng, task_len, cal)
        calls, results = [], []
        for n in random_lengths(len_rng, turns - 1, tool_result_len, 0.5) if turns > 1 else []:
            tool = task_rng.choice(tools)["function"]["name"] if tools else "lookup"
            args = json.dumps({"query": words(task_rng, 24), "limit": task_rng.randint(1, 20)})
            calls.append((tool, args))
            results.append(fit_text(result_rng, n, cal))
        out.append(AgentSession(s, task, calls, results))
    return AgentTrace(system, tools, out, turns)
