"""The text of a growing output, token by token.

Text is emitted only once it can no longer change: a token whose bytes do not
yet complete a character (the decoded text ends in U+FFFD) is held until a
later token completes it; whatever is still held at the end is dropped (bytes
that never became a character; vLLM's detokenizer drops them too, and
replacement characters inside the text stay). This is the incremental detokenization vLLM
does (a window of a few tokens decoded with its prefix for context), done here
so that the text depends on the token sequence alone: an instance that
continues a request (a migration, a replay) carries on the same state and
emits exactly the characters the first instance would have.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from infra.contract import SamplingSpec
from instance.engine import Tokenizer
from migration.protocol import TextState

CONTEXT_TOKENS = 5
"""Prompt tokens decoded before the first output token, for context (leading
spaces, merges), as vLLM's detokenizer starts."""


def special_tokens(sampling: SamplingSpec) -> dict[str, bool]:
    """The decoding options of ``sampling``, as :class:`TextStream` takes them."""
    return {"skip_special_tokens": sampling.skip_special_tokens,
            "spaces_between_special_tokens": sampling.spaces_between_special_tokens}  # fmt: skip


@dataclass
class TextStream:
    tokenizer: Tokenizer
    window: list[int]
    """Tokens from the last emitted boundary's prefix on."""
    read_offset: int
    """Where the not-yet-emitted tokens start in ``window``."""
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    """How special tokens are decoded (vLLM's sampling options of those names)."""

    @classmethod
    def start(cls, tokenizer: Tokenizer, prompt: Sequence[int], *,
              skip_special_tokens: bool = True,
              spaces_between_special_tokens: bool = True) -> TextStream:  # fmt: skip
        tail = list(prompt[-CONTEXT_TOKENS:])
        return cls(tokenizer, tail, len(tail), skip_special_tokens, spaces_between_special_tokens)

    @classmethod
    def resumed(cls, tokenizer: Tokenizer, state: TextState, *,
                skip_special_tokens: bool = True,
                spaces_between_special_tokens: bool = True) -> TextStream:  # fmt: skip
        return cls(tokenizer, list(state.window), state.read_offset, skip_special_tokens,
                   spaces_between_special_tokens)  # fmt: skip

    @classmethod
    def replayed(cls, tokenizer: Tokenizer, prompt: Sequence[int], output: Sequence[int], *,
                 skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True) -> tuple[TextStream, str]:  # fmt: skip
        """The stream after ``output``, and the text it emitted on the way."""
        stream = cls.start(tokenizer, prompt, skip_special_tokens=skip_special_tokens,
                           spaces_between_special_tokens=spaces_between_special_tokens)  # fmt: skip
        return stream, stream.push(output)

    @property
    def state(self) -> TextState:
        return TextState(window=list(self.window), read_offset=self.read_offset)

    def push(self, tokens: Iterable[int]) -> str:
        """The text that ``tokens`` complete."""
        out = []
        for token in tokens:
            self.window.append(token)
            out.append(self._advance())
        return "".join(out)

    def flush(self) -> str:
        """At the end of the output: what is still held back is tokens whose
        text ends in an incomplete character, so nothing more comes out
        (vLLM's detokenizer ends the same way)."""
        return ""

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(
            token_ids, skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )  # fmt: skip

    def _advance(self) -> str:
        prefix = self._decode(self.window[: self.read_offset])
        text = self._decode(self.window)
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        del self.window[: self.read_offset]  # the new boundary's prefix starts here
        self.read_offset = len(self.window)
        return text[len(prefix) :]
