"""Chat templates from checkpoints, rendered in a sandboxed jinja2 environment.

Templates come with checkpoints, so they are not trusted code; errors name the message at fault.
"""

from __future__ import annotations

from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (bad role, template error)."""


def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    if not template:
        raise ChatTemplateError("messages: this model has no chat template; use /v1/completions")
    try:
        return _compile(template).render(
            messages=normalize_messages(messages),
            tools=tools or None,
            add_generation_prompt=add_generation_prompt,
        )
    except ChatTemplateError:
        raise
    except Exception as exc:  # template errors come from the checkpoint, name them for the client
        raise ChatTemplateError(f"messages: cannot render the chat template ({exc})") from exc


_TEMPLATES: dict[str, Any] = {}


def _compile(source: str) -> Any:
    if source not in _TEMPLATES:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.policies["json.dumps_kwargs"] = {"ensure_ascii": False}
        env.globals["raise_exception"] = _raise
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI content parts ([{"type": "text", "text": ...}]) -> plain strings, as templates expect."""
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{i}]: expected an object with a string 'role'")
        content = message.get("content")
        if isinstance(content, list):
            texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content):
                raise ChatTemplateError(f"messages[{i}].content: only text parts are supported")
            message = {**message, "content": "".join(texts)}
        elif content is not None and not isinstance(content, str):
            raise ChatTemplateError(f"messages[{i}].content: expected a string or a list of text parts")
        out.append(message)
    return out
