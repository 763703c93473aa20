"""The qwen25 tool-call parser and the streaming hold-back."""

from __future__ import annotations

import json

from ling_runtime.text.tool_parser import ToolCallStreamer, parse_tool_calls


def test_parses_calls_and_keeps_surrounding_content() -> None:
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    assert calls[0].to_openai()["type"] == "function"


def test_two_calls_and_unique_ids() -> None:
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "" and [c.name for c in calls] == ["a", "b"]
    assert calls[0].id != calls[1].id


def test_malformed_block_stays_content() -> None:
    text = "<tool_call>{not json}</tool_call>"
    assert parse_tool_calls(text) == (text, [])
    no_name = '<tool_call>{"arguments": {}}</tool_call>'
    assert parse_tool_calls(no_name) == (no_name, [])


def test_streamer_never_leaks_a_split_tag_as_content() -> None:
    text = 'Sure. <tool_call>{"name": "f", "arguments": {"q": "<x>"}}</tool_call>'
    for cut in range(1, len(text)):
        streamer = ToolCallStreamer()
        sent = streamer.feed(text[:cut]) + streamer.feed(text[cut:])
        rest, calls = streamer.finish()
        assert "<tool" not in sent and "<" not in sent.replace("Sure. ", "")
        assert sent + rest == "Sure. " or (sent + rest).strip() == "Sure."
        assert [c.name for c in calls] == ["f"]


def test_streamer_releases_text_that_only_looked_like_a_tag() -> None:
    streamer = ToolCallStreamer()
    assert streamer.feed("a <to") == ""
    assert streamer.feed("ast>") == "a <toast>"
    assert streamer.finish() == ("", [])
