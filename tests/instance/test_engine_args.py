"""The engine arguments chosen by platform (``instance.engine_args``), for the
CPU build and for a described CUDA host: no GPU, no vLLM engine. And the KV
connector's ports: one per tensor-parallel rank, consecutive."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Iterator

import pytest

from infra.settings import InstanceSettings
from instance.engine_args import CPU, CPU_DEFAULTS, MiB, Platform, describe, engine_args
from instance.main import pick_ports

MODEL = "Qwen/Qwen2.5-7B-Instruct"
A10G = Platform("cuda", ("NVIDIA A10G",) * 4, (23 * 1024**3,) * 4)
"""A g5.12xlarge as vLLM describes it: four 24 GB A10Gs."""


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SHOAL_"):
            monkeypatch.delenv(name)


def test_cpu_keeps_the_tiny_model_defaults() -> None:
    a = engine_args(InstanceSettings(), CPU, "/cache/tiny-llama")
    assert a.kwargs() == {
        "model": "/cache/tiny-llama", "dtype": "float32", "max_model_len": 2048,
        "max_num_seqs": 16, "kv_cache_memory_bytes": 64 * MiB, "enforce_eager": True,
        "tensor_parallel_size": 1, "seed": 0,
    }  # fmt: skip
    assert a.gpu_memory_utilization is None and a.block_size is None
    assert (CPU_DEFAULTS.max_model_len, CPU_DEFAULTS.max_num_seqs) == (2048, 16)
    assert a.reasons["kv_cache_memory_bytes"] == "CPU default"


def test_cuda_leaves_sizing_to_vllm() -> None:
    a = engine_args(InstanceSettings(model=MODEL), A10G, MODEL)
    kwargs = a.kwargs()
    assert "kv_cache_memory_bytes" not in kwargs
    assert kwargs["gpu_memory_utilization"] == InstanceSettings().gpu_memory_utilization
    assert kwargs["enforce_eager"] is False  # CUDA graphs captured
    assert "max_model_len" not in kwargs and "max_num_seqs" not in kwargs
    assert kwargs["dtype"] == "auto" and kwargs["tensor_parallel_size"] == 1
    assert "gpu_memory_utilization" in a.reasons["kv_cache_memory_bytes"]
    assert a.values()["max_model_len"] is None  # shown, as vLLM's choice


@pytest.mark.parametrize("platform", [CPU, A10G], ids=["cpu", "cuda"])
def test_explicit_settings_win_everywhere(platform: Platform) -> None:
    s = InstanceSettings(model=MODEL, kv_cache_bytes=4096 * MiB, max_model_len=4096,
                         max_num_seqs=64, enforce_eager=True, block_size=16,
                         gpu_memory_utilization=0.5)  # fmt: skip
    a = engine_args(s, platform, MODEL)
    kwargs = a.kwargs()
    assert kwargs["kv_cache_memory_bytes"] == 4096 * MiB
    assert "gpu_memory_utilization" not in kwargs  # the bytes decide
    assert (kwargs["max_model_len"], kwargs["max_num_seqs"], kwargs["block_size"]) == (4096, 64, 16)
    assert kwargs["enforce_eager"] is True
    assert all(a.reasons[k] == "setting" for k in ("kv_cache_memory_bytes", "max_model_len"))


def test_explicit_utilization_and_graphs_off_on_cpu() -> None:
    gpu = engine_args(InstanceSettings(model=MODEL, gpu_memory_utilization=0.8), A10G, MODEL)
    assert gpu.gpu_memory_utilization == 0.8 and gpu.reasons["gpu_memory_utilization"] == "setting"
    cpu = engine_args(InstanceSettings(enforce_eager=False, gpu_memory_utilization=0.8), CPU, "m")
    assert cpu.enforce_eager is False and cpu.gpu_memory_utilization is None


def test_tensor_parallelism_is_passed_and_checked_against_the_devices() -> None:
    a = engine_args(InstanceSettings(model=MODEL, tensor_parallel_size=4), A10G, MODEL)
    assert a.kwargs()["tensor_parallel_size"] == 4
    with pytest.raises(ValueError, match=r"tensor_parallel_size 8 needs 8 devices.*sees 4"):
        engine_args(InstanceSettings(model=MODEL, tensor_parallel_size=8), A10G, MODEL)
    with pytest.raises(ValueError, match="sees 0"):
        engine_args(InstanceSettings(model=MODEL), Platform("cuda"), MODEL)


def test_other_accelerators_are_treated_like_cuda() -> None:
    a = engine_args(InstanceSettings(model=MODEL), Platform("rocm", ("MI300X",)), MODEL)
    assert a.enforce_eager is False and a.kv_cache_memory_bytes is None


def test_unset_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_ENFORCE_EAGER", "false")
    monkeypatch.setenv("SHOAL_TENSOR_PARALLEL_SIZE", "2")
    s = InstanceSettings()
    assert (s.enforce_eager, s.tensor_parallel_size, s.kv_cache_bytes) == (False, 2, None)


def test_describe_names_the_platform_and_every_argument() -> None:
    text = describe(InstanceSettings(model=MODEL, tensor_parallel_size=2), A10G, MODEL)
    assert text.splitlines()[0] == "platform: cuda: 4 x NVIDIA A10G (23.0 GiB)"
    for name in ("kv_cache_memory_bytes", "gpu_memory_utilization", "enforce_eager",
                 "max_model_len", "max_num_seqs", "tensor_parallel_size"):  # fmt: skip
        (line,) = [ln for ln in text.splitlines() if ln.split()[0] == name]
        if name in ("kv_cache_memory_bytes", "max_model_len", "max_num_seqs"):
            assert "(vLLM)" in line
    assert "tensor_parallel_size" in text and " 2 " in text


def test_the_default_utilization_is_vllms() -> None:
    config = pytest.importorskip("vllm.config")
    assert InstanceSettings().gpu_memory_utilization == config.CacheConfig().gpu_memory_utilization


def test_block_size_check_only_when_both_are_set() -> None:
    InstanceSettings(block_size=32)  # max_model_len unset: the platform's
    with pytest.raises(ValueError, match="must be >= block_size"):
        InstanceSettings(block_size=32, max_model_len=16)


# ------------------------------------------------ KV connector ports ---


@pytest.fixture
def taken() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_given_port_is_used_as_is() -> None:
    assert pick_ports("127.0.0.1", 23456, 4) == 23456


@pytest.mark.parametrize("count", [1, 2, 4])
def test_free_ports_are_consecutive(count: int) -> None:
    first = pick_ports("127.0.0.1", 0, count)
    assert all(_free(p) for p in range(first, first + count))


def test_a_run_with_a_taken_port_is_skipped(taken: list[socket.socket]) -> None:
    """A run whose ports are taken is not picked again: the next run lies
    clear of them and is wholly free."""
    first = pick_ports("127.0.0.1", 0, 2)
    for p in (first, first + 1):
        s = socket.socket()
        s.bind(("127.0.0.1", p))
        taken.append(s)
    again = pick_ports("127.0.0.1", 0, 2)
    assert again not in (first - 1, first, first + 1)
    assert _free(again) and _free(again + 1)


@pytest.mark.parametrize("platform", [CPU, A10G], ids=["cpu", "cuda"])
def test_the_arguments_are_vllms(platform: Platform) -> None:
    """Every argument chosen is a field of ``AsyncEngineArgs``, of a type it takes."""
    arg_utils = pytest.importorskip("vllm.engine.arg_utils")
    fields = {f.name: f for f in dataclasses.fields(arg_utils.AsyncEngineArgs)}
    for name, value in engine_args(InstanceSettings(model=MODEL), platform, MODEL).kwargs().items():
        assert name in fields, f"{name} is no argument of vLLM's AsyncEngineArgs"
        default = fields[name].default
        if default is not None and default is not dataclasses.MISSING:
            assert isinstance(value, type(default)), f"{name}: {value!r} vs {default!r}"
