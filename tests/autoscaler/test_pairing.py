"""Pairing policies over hand-built snapshots: drains first, high-priority
protection, Llumnix balancing, one migration per instance at a time."""

from __future__ import annotations

from autoscaler.decisions import Migrate
from autoscaler.policies import PAIRING, PairingConfig
from infra.records import InstanceStatus
from tests.autoscaler.snapshots import inst, snap

llumnix = PAIRING.get("llumnix")
CFG = PairingConfig(migrate_out_below=5, migrate_in_above=40, protect_above=80, drain_batch=4)


def pairs(ms: list[Migrate]) -> list[tuple[str, str]]:
    return [(m.source, m.destination) for m in ms]


def test_balance_pairs_least_free_with_freest() -> None:
    hot1 = inst("hot1", running=20, used=99)  # freeness 0.05
    hot2 = inst("hot2", running=10, used=70)  # 3
    cold1 = inst("cold1", running=1, used=5)  # 95
    cold2 = inst("cold2", running=1, used=50)  # 50
    mid = inst("mid", running=4, used=60)  # 10: neither
    assert pairs(llumnix(snap(hot1, hot2, cold1, cold2, mid), CFG)) == [
        ("hot1", "cold1"), ("hot2", "cold2"),
    ]  # fmt: skip


def test_no_migration_when_nothing_is_short() -> None:
    assert llumnix(snap(inst("a", running=2, used=40), inst("b")), CFG) == []


def test_drain_goes_first_and_takes_the_freest() -> None:
    draining = inst("d", running=3, used=30, status=InstanceStatus.DRAINING)
    hot = inst("hot", running=20, used=99)
    cold = inst("cold")
    out = llumnix(snap(draining, hot, cold), CFG)
    assert pairs(out) == [("d", "cold")]  # hot has no free partner left
    assert out[0].count == 4


def test_one_migration_per_instance_including_those_in_flight() -> None:
    hot = inst("hot", running=20, used=99)
    cold = inst("cold")
    assert llumnix(snap(hot, cold, migrating=frozenset({"cold"})), CFG) == []


def test_high_priority_instance_sheds_lower_priority_requests() -> None:
    crowded = inst("vip", running=4, used=60, high=1)  # freeness 10 < 80
    other = inst("other", running=1, used=10)  # 90
    out = llumnix(snap(crowded, other), CFG)
    assert pairs(out) == [("vip", "other")]
    assert out[0].selection == "lowest-priority" and out[0].count == 1


def test_high_only_instance_is_left_alone() -> None:
    only_high = inst("vip", running=2, used=60, high=2)
    assert llumnix(snap(only_high, inst("other")), CFG) == []


def test_none_policy_only_drains() -> None:
    none = PAIRING.get("none")
    hot, cold = inst("hot", running=20, used=99), inst("cold")
    assert none(snap(hot, cold), CFG) == []
    draining = inst("d", running=1, used=10, status=InstanceStatus.DRAINING)
    assert pairs(none(snap(draining, cold), CFG)) == [("d", "cold")]
