"""Byte-level tokenizer of the sim engine: one token per UTF-8 byte."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from instance.engine import ChatMessage


class ByteTokenizer:
    """Token ids are byte values; the chat template is ``role: content`` lines."""

    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))  # bytes: no special tokens

    def apply_chat_template(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[Mapping[str, Any]] | None = None,
        kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """``role: content`` lines; the tools and variables are not shown."""
        rendered = "".join(f"<{m.role}>{m.content}\n" for m in messages) + "<assistant>"
        return self.encode(rendered)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True,
               spaces_between_special_tokens: bool = True) -> str:  # fmt: skip
        """Bytes have no special tokens: the options change nothing."""
        return bytes(t % 256 for t in token_ids).decode("utf-8", errors="replace")
