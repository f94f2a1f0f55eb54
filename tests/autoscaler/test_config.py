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
from autoscaler.main import controller_config
from autoscaler.policies import PairingConfig, ScalingConfig
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
