"""The ``shoal`` command: server flags come from the settings, and a server's
subcommand loads nothing of the other components."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from infra.cluster_auth import SECRET_VARIABLES
from infra.flags import given
from infra.settings import AutoscalerSettings, GatewaySettings, InstanceSettings
from shoal.cli import build_parser
from tests.helpers import REPO, SHOAL


@pytest.mark.parametrize(("command", "settings"), [
    ("instance", InstanceSettings), ("gateway", GatewaySettings),
    ("autoscaler", AutoscalerSettings),
])  # fmt: skip
def test_every_scalar_setting_is_a_flag_with_its_documentation(
    command: str, settings: type[InstanceSettings | GatewaySettings | AutoscalerSettings]
) -> None:
    parser = build_parser(command)
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    server = sub.choices[command]  # type: ignore[index]
    flags = {a.dest: a for a in server._actions if a.dest != "help"}
    for name, info in settings.model_fields.items():
        if info.annotation in (dict, list) or str(info.annotation).startswith(("dict", "list")):
            continue
        if "SecretStr" in str(info.annotation):  # never on a command line: see infra.flags
            assert name not in flags, f"{command}: the secret {name} is a flag"
            continue
        assert name in flags, f"{command}: no flag for {name}"
        assert flags[name].help, f"{command} --{name}: undocumented"


@pytest.mark.parametrize("command", ["instance", "gateway", "autoscaler"])
def test_a_server_without_a_cluster_secret_does_not_start(command: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARIABLES}
    flags = ["--engine", "sim"] if command == "instance" else ["--port", "0"]
    out = subprocess.run([*SHOAL, command, *flags], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "no cluster secret" in out.stderr and "SHOAL_CLUSTER_SECRET_FILE" in out.stderr


def test_flags_parse_into_settings() -> None:
    args = build_parser("instance").parse_args(
        ["instance", "--engine", "sim", "--max-num-seqs", "3", "--no-kv-transfer",
         "--sim-speedup", "2.5"]
    )  # fmt: skip
    settings = InstanceSettings(**given(args, InstanceSettings))
    assert (settings.engine, settings.max_num_seqs, settings.kv_transfer) == ("sim", 3, False)
    assert settings.sim_speedup == 2.5 and settings.block_size is None  # unset: the default


def test_a_server_subcommand_loads_no_other_component() -> None:
    code = ("import sys; from shoal.cli import build_parser; build_parser('instance')"
            ".parse_args(['instance']); print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'gateway', 'autoscaler', 'bench', 'migration', 'instance'}))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_policy_flags_offer_the_registered_names() -> None:
    from autoscaler.policies import PAIRING, SCALING
    from gateway.policies import DISPATCH

    for command, dest, registry in (("gateway", "dispatch_policy", DISPATCH),
                                    ("autoscaler", "scaling_policy", SCALING),
                                    ("autoscaler", "pairing_policy", PAIRING)):  # fmt: skip
        (sub,) = [a for a in build_parser(command)._actions if a.dest == "command"]
        server = sub.choices[command]  # type: ignore[index]
        (flag,) = [a for a in server._actions if a.dest == dest]
        assert flag.choices == registry.names() and "(default)" in (flag.help or "")
