"""The vLLM engine arguments Shoal chooses, by platform (docs/ENGINE.md).

One pure function, :func:`engine_args`, turns an instance's settings and the
platform it runs on into the keyword arguments Shoal decides for vLLM's
``AsyncEngineArgs``, each with the reason it has its value. The CPU build
gets the tiny-model defaults (64 MiB of KV cache, 2048 tokens, 16 sequences,
eager mode); on a GPU (or another accelerator vLLM supports) what the
operator leaves unset is left to vLLM: the KV cache fills
``gpu_memory_utilization`` of each device, the context is the model's, the
batch limit is vLLM's and CUDA graphs are captured. A setting given
explicitly wins everywhere.

:func:`detect_platform` asks vLLM (imported lazily: importing this module is
cheap) which platform this process sees; :func:`describe` prints the choice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from infra.settings import InstanceSettings

log = logging.getLogger(__name__)

MiB = 1024 * 1024

EngineArgValue = str | int | float | bool | None
"""A value of one engine argument (None: not passed, vLLM decides)."""


@dataclass(frozen=True)
class CpuDefaults:
    """What the CPU build (and the sim engine) uses for settings left unset:
    sized for the generated tiny model on a few cores."""

    kv_cache_bytes: int = 64 * MiB
    """KV-cache memory (vLLM's ``kv_cache_memory_bytes``)."""
    max_model_len: int = 2048
    """Longest sequence (prompt + output)."""
    max_num_seqs: int = 16
    """Largest batch."""
    enforce_eager: bool = True
    """No graph capture (the CPU build has none)."""
    tiny_model_dtype: str = "float32"
    """dtype of the generated tiny model when ``dtype`` is ``auto``."""


CPU_DEFAULTS = CpuDefaults()


@dataclass(frozen=True)
class Platform:
    """Where an engine runs, as vLLM sees it from this process."""

    kind: str
    """``cpu``, ``cuda``, or another accelerator vLLM supports (``rocm``,
    ``xpu``, ``tpu``, ...): vLLM's ``current_platform.device_name``."""
    devices: tuple[str, ...] = ()
    """Names of the visible devices, one per device (none on CPU)."""
    memory_bytes: tuple[int, ...] = ()
    """Total memory of each device, where known."""

    @property
    def is_cpu(self) -> bool:
        return self.kind == "cpu"

    @property
    def device_count(self) -> int:
        return len(self.devices)

    def summary(self) -> str:
        """``cuda: 2 x NVIDIA A10G (22.5 GiB)``, ``cpu``."""
        if not self.devices:
            return self.kind
        names = sorted(set(self.devices))
        memory = f" ({self.memory_bytes[0] / 1024**3:.1f} GiB)" if self.memory_bytes else ""
        name = names[0] if len(names) == 1 else ", ".join(names)
        return f"{self.kind}: {self.device_count} x {name}{memory}"


CPU = Platform("cpu")
"""The CPU build's platform (no devices)."""


def detect_platform() -> Platform:
    """The platform vLLM detects in this process (``CUDA_VISIBLE_DEVICES``
    and the like apply), with its visible devices. Queries the device
    management library (NVML on CUDA), not the CUDA runtime, so no CUDA
    context is made before vLLM starts its workers."""
    from vllm.platforms import current_platform as p

    kind = str(p.device_name or p.device_type or "unknown")
    if p.is_cpu():
        return Platform("cpu")
    count = int(_ask(p.device_count, 0))
    devices = tuple(str(_ask(lambda i=i: p.get_device_name(i), kind)) for i in range(count))
    memory = tuple(int(_ask(lambda i=i: p.get_device_total_memory(i), 0)) for i in range(count))
    return Platform(kind, devices, memory if all(memory) else ())


def _ask(query: Any, default: Any) -> Any:
    """``query()``, or ``default`` where the platform cannot answer."""
    try:
        return query()
    except Exception as exc:  # NotImplementedError, NVML errors, ...
        log.debug("platform query failed: %s: %s", type(exc).__name__, exc)
        return default


@dataclass(frozen=True)
class EngineArgsChoice:
    """The ``AsyncEngineArgs`` keywords Shoal decides, and why. A None value
    is not passed: vLLM chooses (see :meth:`kwargs`)."""

    platform: Platform
    """Where the engine runs."""
    model: str
    """Hugging Face model id or local path."""
    dtype: str
    """Weights and activations dtype."""
    block_size: int | None
    """Tokens per KV block (None: vLLM picks one its kernels accept)."""
    max_model_len: int | None
    """Longest sequence (None: the model's context length)."""
    max_num_seqs: int | None
    """Largest batch (None: vLLM's default for the platform)."""
    kv_cache_memory_bytes: int | None
    """KV-cache bytes per device (None: sized from ``gpu_memory_utilization``)."""
    gpu_memory_utilization: float | None
    """Share of each device's memory vLLM may use (None on CPU, or when the
    KV cache is given in bytes)."""
    enforce_eager: bool
    """No graph capture."""
    tensor_parallel_size: int
    """Ranks (devices) one instance spans."""
    seed: int = 0
    """vLLM's global seed."""
    reasons: Mapping[str, str] = field(default_factory=dict)
    """Why each argument has its value, by argument name."""

    ARGS = ("model", "dtype", "block_size", "max_model_len", "max_num_seqs",
            "kv_cache_memory_bytes", "gpu_memory_utilization", "enforce_eager",
            "tensor_parallel_size", "seed")  # fmt: skip
    """The arguments, in the order they are shown."""

    def values(self) -> dict[str, EngineArgValue]:
        """Every argument Shoal decides, None where vLLM chooses."""
        return {name: getattr(self, name) for name in self.ARGS}

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``AsyncEngineArgs``: the arguments with a value."""
        return {k: v for k, v in self.values().items() if v is not None}

    def describe(self) -> str:
        """One line per argument: name, value (``(vLLM)`` where vLLM chooses)
        and reason, under a line naming the platform."""
        rows = [(n, _shown(n, v, self.reasons.get(n, "")), self.reasons.get(n, ""))
                for n, v in self.values().items()]  # fmt: skip
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"platform: {self.platform.summary()}"]
        lines += [f"  {n:<{w0}}  {v:<{w1}}  {why}".rstrip() for n, v, why in rows]
        return "\n".join(lines)


def _shown(name: str, value: EngineArgValue, reason: str) -> str:
    """An argument's value in :meth:`EngineArgsChoice.describe`."""
    if value is None:
        return "-" if reason.startswith("not used") else "(vLLM)"
    if name == "kv_cache_memory_bytes" and isinstance(value, int):
        return f"{value} ({value / MiB:g} MiB)"
    return str(value)


def engine_args(settings: InstanceSettings, platform: Platform, model: str) -> EngineArgsChoice:
    """The engine arguments for ``model`` on ``platform`` from ``settings``:
    an explicit setting wins; an unset one takes the CPU defaults on CPU
    (:data:`CPU_DEFAULTS`) and vLLM's choice elsewhere. Raises ValueError if
    the instance asks for more tensor-parallel ranks than there are devices."""
    s, cpu = settings, platform.is_cpu
    _check_devices(s.tensor_parallel_size, platform)
    where = "CPU default" if cpu else f"unset on {platform.kind}"
    why: dict[str, str] = {}

    def pick(name: str, value: Any, cpu_default: Any, otherwise: str) -> Any:
        """The setting, else the CPU default on CPU, else None (vLLM's)."""
        chosen = value if value is not None else cpu_default if cpu else None
        why[name] = "setting" if value is not None else where if cpu else f"{where}: {otherwise}"
        return chosen

    tiny = s.model is None
    dtype = CPU_DEFAULTS.tiny_model_dtype if tiny and s.dtype == "auto" else s.dtype
    why["model"] = "generated tiny model" if tiny else "setting"
    why["dtype"] = ("setting" if s.dtype != "auto" else
                    "generated tiny model" if tiny else "model's dtype")  # fmt: skip
    why["block_size"] = "setting" if s.block_size else "vLLM picks one its kernels accept"
    max_model_len = pick("max_model_len", s.max_model_len, CPU_DEFAULTS.max_model_len,
                         "the model's context length")  # fmt: skip
    max_num_seqs = pick("max_num_seqs", s.max_num_seqs, CPU_DEFAULTS.max_num_seqs,
                        "vLLM's default")  # fmt: skip
    kv_bytes = pick("kv_cache_memory_bytes", s.kv_cache_bytes, CPU_DEFAULTS.kv_cache_bytes,
                    "sized from gpu_memory_utilization")  # fmt: skip
    utilization = None if cpu or kv_bytes is not None else s.gpu_memory_utilization
    why["gpu_memory_utilization"] = (
        "not used on CPU" if cpu
        else "not used: the KV cache is given in bytes" if kv_bytes is not None
        else _explicit(s, "gpu_memory_utilization", "default (vLLM's)")
    )  # fmt: skip
    # Unset on an accelerator: False (passed as such), so graphs are captured.
    eager = pick("enforce_eager", s.enforce_eager, CPU_DEFAULTS.enforce_eager,
                 "capture CUDA graphs")  # fmt: skip
    why["tensor_parallel_size"] = _explicit(s, "tensor_parallel_size", "default (one device)")
    why["seed"] = "Shoal's fixed seed"
    return EngineArgsChoice(
        platform=platform, model=model, dtype=dtype, block_size=s.block_size,
        max_model_len=max_model_len, max_num_seqs=max_num_seqs, kv_cache_memory_bytes=kv_bytes,
        gpu_memory_utilization=utilization, enforce_eager=bool(eager),
        tensor_parallel_size=s.tensor_parallel_size, reasons=why,
    )  # fmt: skip


def _explicit(settings: InstanceSettings, name: str, otherwise: str) -> str:
    """``setting`` if ``name`` was given (argument or environment), else ``otherwise``."""
    return "setting" if name in settings.model_fields_set else otherwise


def _check_devices(tensor_parallel_size: int, platform: Platform) -> None:
    """One device per rank on an accelerator (the CPU build has no devices)."""
    tp = tensor_parallel_size
    if not platform.is_cpu and tp > platform.device_count:
        raise ValueError(
            f"tensor_parallel_size {tp} needs {tp} devices, but this process sees "
            f"{platform.device_count} ({platform.summary()}); check CUDA_VISIBLE_DEVICES "
            "or the GPUs the provider gives each instance (ray_num_gpus)"
        )


def describe(settings: InstanceSettings, platform: Platform, model: str) -> str:
    """The engine arguments :func:`engine_args` chooses, one per line with
    its reason (for start-up logs and ``make gpu-check``)."""
    return engine_args(settings, platform, model).describe()
