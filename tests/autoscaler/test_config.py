"""The autoscaler's configs: filled from the settings in one place, by name,
with the same defaults, and every field documented."""

from __future__ import annotations

import ast
import inspect
import os
from dataclasses import fields, replace
from types import ModuleType

import pytest

import autoscaler.controller
import autoscaler.policies.pairing
import autoscaler.policies.scaling
import autoscaler.policies.tick
import bench.simulator.config
from autoscaler.controller import ControllerConfig
from autoscaler.main import controller_config, worker_launch
from autoscaler.policies import PairingConfig, ScalingConfig
from infra.cluster_auth import ClusterSecretMissing
from infra.settings import AutoscalerSettings


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SHOAL_"):
            monkeypatch.delenv(name)


def test_every_knob_the_settings_have_reaches_its_config(no_env: None) -> None:
    s = AutoscalerSettings(
        engine="sim", min_instances=2, max_instances=7, freeness_low=3, freeness_high=33,
        scale_out_ticks=5, scale_in_ticks=6, cooldown_s=1.5, idle_timeout_s=9,
        start_timeout_s=42, migrate_out_below=1, migrate_in_above=50, protect_above=70,
        tick_s=0.25, scaling_policy="static", pairing_policy="none",
    )  # fmt: skip
    c = controller_config(s)
    assert c.scaling == ScalingConfig(
        min_instances=2, max_instances=7, freeness_low=3, freeness_high=33, scale_out_ticks=5,
        scale_in_ticks=6, cooldown_s=1.5, idle_timeout_s=9, start_timeout_s=42,
    )  # fmt: skip
    assert c.pairing == PairingConfig(migrate_out_below=1, migrate_in_above=50, protect_above=70)
    assert (c.model_name, c.tick_s, c.scaling_policy, c.pairing_policy) == (
        "sim-model", 0.25, "static", "none")  # fmt: skip


def test_the_settings_defaults_are_the_configs_defaults(no_env: None) -> None:
    c = controller_config(AutoscalerSettings(engine="sim"))
    assert c.scaling == ScalingConfig() and c.pairing == PairingConfig()
    assert c == replace(ControllerConfig("sim-model"), scaling=c.scaling, pairing=c.pairing)
    shared = [f.name for cls in (ScalingConfig, PairingConfig, ControllerConfig)
              for f in fields(cls) if f.name in AutoscalerSettings.model_fields]  # fmt: skip
    assert len(shared) >= 15, shared  # (a rename on one side would shrink this)


@pytest.mark.parametrize(
    "module",
    [autoscaler.controller, autoscaler.policies.scaling, autoscaler.policies.pairing,
     autoscaler.policies.tick, bench.simulator.config],
)  # fmt: skip
def test_every_config_field_is_documented(module: ModuleType) -> None:
    tree = ast.parse(inspect.getsource(module))
    classes = [
        n for n in tree.body if isinstance(n, ast.ClassDef)
        and any(ast.unparse(d).startswith("dataclass") for d in n.decorator_list)
    ]  # fmt: skip
    assert classes
    for cls in classes:
        for i, node in enumerate(cls.body):
            if isinstance(node, ast.AnnAssign) and "ClassVar" not in ast.unparse(node.annotation):
                nxt = cls.body[i + 1] if i + 1 < len(cls.body) else None
                documented = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                assert documented, f"{cls.name}.{ast.unparse(node.target)} has no docstring"


# ------------------------------------------------ GPUs per instance ---


@pytest.mark.parametrize(
    ("engine", "tp", "gpus", "expected"),
    [("vllm", 1, None, 1.0), ("vllm", 4, None, 4.0), ("sim", 2, None, 0.0),
     ("vllm", 1, 0.0, 0.0), ("vllm", 1, 0.5, 0.5), ("vllm", 2, 2.0, 2.0),
     ("vllm", 2, 0.0, 0.0)],
)  # fmt: skip
def test_each_instance_asks_for_one_gpu_per_rank(
    no_env: None, engine: str, tp: int, gpus: float | None, expected: float
) -> None:
    s = AutoscalerSettings(engine=engine, tensor_parallel_size=tp, ray_num_gpus=gpus)
    assert s.gpus_per_instance == expected


@pytest.mark.parametrize(("tp", "gpus"), [(2, 1.0), (1, 2.0), (4, 2.0), (2, 0.5)])
def test_gpus_that_do_not_fit_the_ranks_are_refused(no_env: None, tp: int, gpus: float) -> None:
    with pytest.raises(ValueError, match=rf"ray_num_gpus \({gpus}\) does not fit "
                                         rf"tensor_parallel_size \({tp}\)"):  # fmt: skip
        AutoscalerSettings(tensor_parallel_size=tp, ray_num_gpus=gpus)


def test_instances_get_the_tensor_parallel_size(no_env: None) -> None:
    s = AutoscalerSettings(tensor_parallel_size=2, model="m", instance_args="--port 8100",
                           cluster_secret="s3cret")  # fmt: skip
    launch = worker_launch(s, "redis://r:6379/0")
    assert launch.args == ("--port", "8100", "--tensor-parallel-size", "2", "--model", "m")
    assert launch.env["SHOAL_CLUSTER_SECRET"] == "s3cret"  # the instances join its cluster
    with pytest.raises(ClusterSecretMissing):  # no secret, no instances
        worker_launch(AutoscalerSettings(), "redis://r:6379/0")
    with pytest.raises(ValueError, match="set tensor_parallel_size instead"):
        AutoscalerSettings(instance_args="--tensor-parallel-size 2")
