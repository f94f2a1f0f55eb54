"""The architecture document names every registered policy with its module,
so a new policy cannot go undocumented."""

from __future__ import annotations

import pytest

from autoscaler.policies import PAIRING, SCALING
from gateway.policies import DISPATCH
from infra.registry import Registry
from migration.policies import SELECTION
from tests.helpers import REPO


@pytest.mark.parametrize("registry", [DISPATCH, SCALING, PAIRING, SELECTION],
                         ids=lambda r: r.family)  # fmt: skip
def test_every_registered_policy_is_in_the_architecture_table(registry: Registry[object]) -> None:
    table = (REPO / "docs" / "ARCHITECTURE.md").read_text().split("## Where each policy lives")[1]
    rows = [line for line in table.splitlines() if line.startswith("|")]
    for name in registry.names():
        assert any(f"`{name}`" in row for row in rows), f"{registry.family} {name!r} undocumented"
