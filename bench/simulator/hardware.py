"""Hardware presets: what one simulated instance is (KV capacity, batch
limits, the step-latency model, the KV link between instances, cold start).

``LLAMA_7B_A10`` is the Llumnix evaluation's instance: LLaMA-7B in fp16 on one
NVIDIA A10 (24 GB). Every coefficient is derived below from public figures,
with the assumed efficiencies named, so a reader can redo the arithmetic:

Public figures
    LLaMA-7B (Touvron et al. 2023; the Hugging Face checkpoint): 6,738,415,616
    parameters, 32 layers, hidden size 4096, fp16 -> 13.48 GB of weights;
    KV per token = 2 (K, V) x 32 layers x 4096 x 2 bytes = 512 KiB.
    NVIDIA A10 datasheet: 24 GB GDDR6 (nvidia-smi shows 23,028 MiB), 600 GB/s,
    125 TFLOPS fp16 tensor (dense; the often-quoted 31.2 TFLOPS is plain FP32).

Decode (memory bound): every step reads all weights once, and each decoding
request's KV once.
    step_base_s                = 13.48e9 B / (0.9 x 600e9 B/s)  = 24.96 ms
    decode_per_context_token_s = 524,288 B / (0.9 x 600e9 B/s)  = 0.971 us
    (0.9 = achieved / peak DRAM bandwidth, typical of large streaming reads
    on GDDR6.) A full cache (856 blocks, 13.7k tokens) adds 13.3 ms a step.
    decode_per_seq_s = 0.1 ms: per-request work that does not hide behind the
    weight reads (sampling, the request's activations, the engine's per-request
    input preparation). It is an assumption, bounded by 0 (all hidden) and
    0.216 ms (a token's 13.5 GFLOP at the prefill rate below, nothing hidden;
    compute only dominates above ~115 requests a step).

Prefill (compute bound): 2 FLOPs per parameter per token.
    prefill_per_token_s = 2 x 6.738e9 / (0.5 x 125e12 FLOP/s)  = 0.216 ms
    (0.5 = model FLOPs utilisation of a prefill, typical for 7B models with
    FlashAttention-style kernels; attention's quadratic term, ~8 % at 2k
    tokens, is left out.) That is ~4,600 prompt tokens/s.

KV capacity (vLLM's sizing with its default ``gpu_memory_utilization=0.9``):
    0.9 x 23,028 MiB = 20,725 MiB usable
    - 12,852 MiB weights
    - 1,024 MiB activations of the profiling run and CUDA graphs (assumed)
    = 6,849 MiB of KV / 8 MiB per 16-token block = 856 blocks (13,696 tokens)
    (all 24 GB with no activations would give ~1,150 blocks: the upper bound).

Cold start: 30 s from the decision to an active instance, an assumption for a
worker whose image is already on the node: load 13.5 GB of weights from local
NVMe at ~2 GB/s (~7 s), vLLM's memory profiling and CUDA-graph capture
(~10-20 s), imports and start-up (~5 s; the CPU build here starts in 35-40 s,
mostly imports, DESIGN.md). Pulling weights over the network adds minutes.

KV link: ``KvTransferModel``'s defaults (10 Gbit/s TCP, 1 ms a stage), the
sim engine's (docs/MIGRATION.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from instance.engine import blocks_for
from instance.sim.core import SimConfig
from instance.sim.kv import LLAMA_7B_FP16_BYTES_PER_TOKEN, KvTransferModel
from instance.sim.latency import LatencyModel

MIB = 1 << 20

LLAMA_7B_PARAMS = 6_738_415_616
LLAMA_7B_WEIGHT_BYTES = 2 * LLAMA_7B_PARAMS
"""fp16: 13.48 GB."""
A10_MEMORY_MIB = 23_028
"""What nvidia-smi reports for a 24 GB A10."""
A10_BANDWIDTH_BYTES_PER_S = 600e9
A10_FP16_TENSOR_FLOPS = 125e12
"""Dense fp16 tensor-core peak."""

BANDWIDTH_EFFICIENCY = 0.9
"""Achieved / peak DRAM bandwidth of a decode step (assumed)."""
PREFILL_MFU = 0.5
"""Model FLOPs utilisation of a prefill (assumed)."""
DECODE_PER_SEQ_S = 1e-4
"""Per-request decode work not hidden behind the weight reads (assumed)."""
GPU_MEMORY_UTILIZATION = 0.9
"""vLLM's default share of GPU memory it sizes the KV cache within."""
ACTIVATION_RESERVE_MIB = 1024
"""Profiling-run activations and CUDA graphs (assumed)."""
BLOCK_SIZE = 16
"""vLLM's default tokens per KV block."""


def kv_blocks(memory_mib: float, weight_bytes: int, bytes_per_token: int) -> int:
    """KV blocks vLLM would allocate: its share of memory minus weights and
    the activation reserve, in blocks of ``BLOCK_SIZE`` tokens."""
    free_mib = GPU_MEMORY_UTILIZATION * memory_mib - weight_bytes / MIB - ACTIVATION_RESERVE_MIB
    return math.floor(free_mib * MIB / (bytes_per_token * BLOCK_SIZE))


@dataclass(frozen=True)
class HardwarePreset:
    """One instance: an engine on one accelerator, as the simulator models it."""

    name: str
    description: str
    latency: LatencyModel
    num_blocks: int
    """KV-cache capacity in blocks."""
    block_size: int = BLOCK_SIZE
    max_num_seqs: int = 256
    """vLLM's default largest batch."""
    max_num_batched_tokens: int = 8192
    """Token budget of a step: caps how many prompts are prefilled together
    (a single prompt longer than this still runs; the sim does not chunk)."""
    kv_transfer: KvTransferModel = field(default_factory=KvTransferModel)
    cold_start_s: float = 30.0
    """Scale-out decision to an active instance."""

    @property
    def max_request_tokens(self) -> int:
        """Longest prompt + output one instance can hold."""
        return self.num_blocks * self.block_size

    def fits(self, num_tokens: int) -> bool:
        return blocks_for(num_tokens, self.block_size) <= self.num_blocks

    def sim_config(self) -> SimConfig:
        return SimConfig(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            latency=self.latency,
        )


LLAMA_7B_A10 = HardwarePreset(
    name="llama-7b-a10",
    description="LLaMA-7B fp16 on one NVIDIA A10 24 GB (the Llumnix evaluation's instance)",
    latency=LatencyModel(
        step_base_s=LLAMA_7B_WEIGHT_BYTES / (BANDWIDTH_EFFICIENCY * A10_BANDWIDTH_BYTES_PER_S),
        prefill_per_token_s=2 * LLAMA_7B_PARAMS / (PREFILL_MFU * A10_FP16_TENSOR_FLOPS),
        decode_per_seq_s=DECODE_PER_SEQ_S,
        decode_per_context_token_s=LLAMA_7B_FP16_BYTES_PER_TOKEN
        / (BANDWIDTH_EFFICIENCY * A10_BANDWIDTH_BYTES_PER_S),
    ),
    num_blocks=kv_blocks(A10_MEMORY_MIB, LLAMA_7B_WEIGHT_BYTES, LLAMA_7B_FP16_BYTES_PER_TOKEN),
    kv_transfer=KvTransferModel(bytes_per_token=LLAMA_7B_FP16_BYTES_PER_TOKEN),
)

HARDWARE_PRESETS: dict[str, HardwarePreset] = {LLAMA_7B_A10.name: LLAMA_7B_A10}
DEFAULT_HARDWARE = LLAMA_7B_A10.name


def hardware_preset(name: str) -> HardwarePreset:
    try:
        return HARDWARE_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown hardware {name!r}; known: {sorted(HARDWARE_PRESETS)}") from None
