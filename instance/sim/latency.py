"""Per-step latency model of the simulated engine.

A step runs the prefills admitted this step and one decode token for every
other running request. Its duration is

    step_base_s
    + prefill_per_token_s      * prefill tokens
    + decode_per_seq_s         * decoding requests
    + decode_per_context_token_s * context tokens of decoding requests

Default coefficients approximate LLaMA-7B on one A10 (24 GB) as in the Llumnix
evaluation: ~25 ms per decode step at moderate batch sizes, ~8k prefill
tokens/s, and decode slowing with batch size and context (attention reads).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LatencyModel:
    step_base_s: float = 0.020
    """Fixed cost of one forward pass (weights read once per step)."""
    prefill_per_token_s: float = 0.000125
    """Cost per prompt token prefilled (compute bound)."""
    decode_per_seq_s: float = 0.0002
    """Cost per request decoded in the step."""
    decode_per_context_token_s: float = 0.0000004
    """Cost per token of context attended to by decoding requests."""

    def step_duration_s(
        self, *, num_prefill_tokens: int, num_decode_seqs: int, num_context_tokens: int
    ) -> float:
        if num_prefill_tokens == 0 and num_decode_seqs == 0:
            return 0.0
        return (
            self.step_base_s
            + self.prefill_per_token_s * num_prefill_tokens
            + self.decode_per_seq_s * num_decode_seqs
            + self.decode_per_context_token_s * num_context_tokens
        )

    def scaled(self, speedup: float) -> LatencyModel:
        """The same model running ``speedup`` times faster (for fast tests)."""
        return LatencyModel(
            step_base_s=self.step_base_s / speedup,
            prefill_per_token_s=self.prefill_per_token_s / speedup,
            decode_per_seq_s=self.decode_per_seq_s / speedup,
            decode_per_context_token_s=self.decode_per_context_token_s / speedup,
        )
