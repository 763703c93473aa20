"""Incremental text for one request: detokenize token by token, apply stop strings, hold back what may
still change.

Byte-level tokens can split a UTF-8 character, and text may be the start of a stop string: both wait
until later tokens decide, because a streamed delta is never retracted. The concatenated deltas
always equal the final text.
"""

from __future__ import annotations

from ling_runtime.text.tokenizer import TokenizerBundle


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without ever emitting half a character.

    Byte-level tokens can split a UTF-8 character; decoding a window of recent tokens and holding back
    text that ends in U+FFFD keeps streamed text identical to decoding everything at the end.
    """

    def __init__(self, bundle: TokenizerBundle, skip_special_tokens: bool = True) -> None:
        self.bundle = bundle
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        prefix_text, full_text = self._window()
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Text still held back at the end of generation (e.g. an incomplete UTF-8 sequence)."""
        prefix_text, full_text = self._window()
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :]

    def _window(self) -> tuple[str, str]:
        """The text already read back (from the prefix offset) and the text of every id since it."""
        decode, skip = self.bundle.decode, self.skip_special_tokens
        return decode(self.ids[self.prefix_offset : self.read_offset], skip), decode(
            self.ids[self.prefix_offset :], skip
        )


class TextOutput:
    """One request's output text: detokenized incrementally, cut at the first stop string."""

    def __init__(self, bundle: TokenizerBundle, stop: list[str], skip_special_tokens: bool = True) -> None:
        self.detok = IncrementalDetokenizer(bundle, skip_special_tokens)
        self.stop = stop
        self.text = ""  # everything decoded so far (before stop truncation)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; return the text that is now final. Sets `stopped` on a stop string."""
        if self.stopped:
            return ""
        self.text += self.detok.add(token_ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of generation."""
        if not self.stopped:
            self.text += self.detok.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        cut = len(self.text)
        if self.stop and not self.stopped:
            # Search from a little before what was sent: a stop string may straddle two deltas.
            window_start = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [i for s in self.stop if (i := self.text.find(s, window_start)) != -1]
            if hits:
                self.stopped = True
                self.text = self.text[: min(hits)]
                cut = len(self.text)
            elif not final:
                cut = len(self.text) - self._held_back()
        delta = self.text[self.sent : cut]
        self.sent = max(self.sent, cut)
        return delta

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    @property
    def final_text(self) -> str:
        return self.text
