"""The `qwen25` tool-call parser: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` -> tool_calls.

Same format as SGLang's qwen25 detector. Text outside the tags stays content; a block whose JSON does
not parse (or lacks a name) is left in the content rather than dropped, so nothing the model wrote is
lost.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object as text, as the OpenAI API carries it

    def to_openai(self, index: int | None = None) -> dict:
        body: dict = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            body["index"] = index
        return body


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Split model output into (content, tool calls)."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    last = 0
    for match in _BLOCK.finditer(text):
        call = _parse_block(match.group(1))
        if call is None:
            continue
        kept.append(text[last : match.start()])
        last = match.end()
        calls.append(call)
    kept.append(text[last:])
    return "".join(kept).strip() if calls else text, calls


def _parse_block(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    return make_tool_call(obj["name"], obj.get("arguments", obj.get("parameters", {})))


def make_tool_call(name: str, arguments: object) -> ToolCall:
    """A call with a fresh id; `arguments` as text (kept) or a JSON value (serialized)."""
    args_text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=name, arguments=args_text)


def could_start_tool_call(text: str) -> bool:
    """True when `text` contains a tool-call start tag or ends with a prefix of one.

    Streaming holds text back from that point so a client never receives half a tag as content.
    """
    if TOOL_CALL_START in text:
        return True
    return any(text.endswith(TOOL_CALL_START[:n]) for n in range(1, len(TOOL_CALL_START)))


class ToolCallStreamer:
    """Streams content while holding back anything that may be a tool call.

    `feed(delta)` returns the content that is safe to send now; `finish()` returns the held-back
    content that turned out not to be a call, and the parsed calls.
    """

    def __init__(self) -> None:
        self.held = ""

    def feed(self, delta: str) -> str:
        if not self.held and not could_start_tool_call(delta):
            return delta
        self.held += delta
        if could_start_tool_call(self.held):
            return ""
        out, self.held = self.held, ""
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        held, self.held = self.held, ""
        if not held:
            return "", []
        return parse_tool_calls(held)
