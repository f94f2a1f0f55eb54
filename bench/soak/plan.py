"""The soak's random choices, pure and seeded: its prompts, and which request
to migrate where. Kept apart from the drivers so tests check them without
processes."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

TOKEN_IDS = (10, 256)
"""Prompt token ids are drawn from [10, 256): valid for the tiny model (320
ids, specials below 8) and the sim engine's byte tokenizer (256)."""
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


class PromptKind(StrEnum):
    COMPLETION_IDS = "completion-ids"
    """``/v1/completions`` with the prompt as token ids."""
    COMPLETION_TEXT = "completion-text"
    """``/v1/completions`` with a text prompt."""
    CHAT = "chat"
    """``/v1/chat/completions`` with one user message."""


@dataclass(frozen=True)
class Prompt:
    index: int
    kind: PromptKind
    max_tokens: int
    ids: tuple[int, ...] = ()
    text: str = ""

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.kind is PromptKind.CHAT else "/v1/completions"

    def _input(self) -> dict[str, Any]:
        if self.kind is PromptKind.CHAT:
            return {"messages": [{"role": "user", "content": self.text}]}
        return {"prompt": list(self.ids) if self.kind is PromptKind.COMPLETION_IDS else self.text}

    def openai_body(self, model: str) -> dict[str, Any]:
        """The streaming request through the gateway: greedy, exactly
        ``max_tokens`` long (``ignore_eos``), with a final usage record."""
        return {"model": model, **self._input(), "max_tokens": self.max_tokens,
                "temperature": 0.0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip

    def generate_body(self, request_id: str) -> dict[str, Any]:
        """The same request straight to an instance (``POST /generate``),
        whole and not migratable: the reference."""
        return {"request_id": request_id, **self._input(), "max_tokens": self.max_tokens,
                "temperature": 0.0, "ignore_eos": True, "stream": False,
                "migratable": False}  # fmt: skip


def make_prompts(num: int, *, seed: int, lengths: tuple[int, int],
                 max_tokens: Sequence[int]) -> list[Prompt]:  # fmt: skip
    """``num`` prompts of their own (no shared prefixes), cycling through the
    three kinds and the given output lengths."""
    rng = random.Random(f"shoal-soak:{seed}")
    kinds = list(PromptKind)
    prompts = []
    for i in range(num):
        kind = kinds[i % len(kinds)]
        n = rng.randint(*lengths)
        out = max_tokens[i % len(max_tokens)]
        if kind is PromptKind.COMPLETION_IDS:
            ids = tuple(rng.randrange(*TOKEN_IDS) for _ in range(n))
            prompts.append(Prompt(i, kind, out, ids=ids))
        else:
            prompts.append(Prompt(i, kind, out, text=_words(rng, n)))
    return prompts


def _words(rng: random.Random, num_chars: int) -> str:
    """Lowercase words about ``num_chars`` long in all (the sim engine's
    tokenizer is one token per byte; a real one makes fewer tokens)."""
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < num_chars:
        words.append("".join(rng.choice(_LETTERS) for _ in range(rng.randint(2, 8))))
    return " ".join(words)


@dataclass(frozen=True)
class MigrationPlan:
    source: str
    destination: str
    request_id: str
    queued: bool
    mode: str


def pick_request(rng: random.Random, requests: Sequence[Mapping[str, Any]],
                 queued_share: float) -> tuple[str, bool] | None:  # fmt: skip
    """A request to move from a ``GET /requests`` listing, or None: only
    migratable ones not already frozen; a queued one (no output yet) with
    probability ``queued_share`` when there are both kinds, so both are moved
    whatever the mix on the instance."""
    movable = [r for r in requests if r.get("migratable") and not r.get("frozen")]
    queued = [r for r in movable if r.get("num_output", 0) == 0]
    running = [r for r in movable if r.get("num_output", 0) > 0]
    if not movable:
        return None
    pool = queued if queued and (not running or rng.random() < queued_share) else running
    chosen = rng.choice(pool)
    return str(chosen["request_id"]), chosen.get("num_output", 0) == 0


def pick_pair(rng: random.Random, instances: Sequence[str]) -> tuple[str, str] | None:
    """A random ordered (source, destination) pair: every direction alike."""
    if len(instances) < 2:
        return None
    source, destination = rng.sample(list(instances), 2)
    return source, destination
