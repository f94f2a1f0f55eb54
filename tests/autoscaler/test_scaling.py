"""Scaling policies over hand-built snapshots: the band's hysteresis,
cooldown, bounds, choice of the instance to drain, scale to zero and back."""

from __future__ import annotations

from dataclasses import replace

import pytest

from autoscaler.decisions import Decision, Drain, ScaleOut, Stop
from autoscaler.policies import SCALING, ScalingConfig, ScalingState
from autoscaler.snapshot import InstanceState, Snapshot
from infra.records import InstanceStatus
from tests.autoscaler.snapshots import inst, snap

band = SCALING.get("band")
CFG = ScalingConfig(
    min_instances=1, max_instances=3, freeness_low=10, freeness_high=60, scale_out_ticks=3,
    scale_in_ticks=2, cooldown_s=5, idle_timeout_s=30,
)  # fmt: skip


def run(
    cfg: ScalingConfig, *snaps: Snapshot, state: ScalingState | None = None
) -> list[list[Decision]]:
    state = state or ScalingState()
    out = []
    for s in snaps:
        decisions, state = band(s, cfg, state)
        out.append(list(decisions))
    return out


def busy(name: str) -> InstanceState:
    return inst(name, running=10, used=95)  # freeness 0.5


def test_scale_out_only_after_enough_low_ticks() -> None:
    ticks = [snap(busy("a"), now=t) for t in (100, 101, 102)]
    out = run(CFG, *ticks)
    assert out[0] == [] and out[1] == []
    # (35 * 10 + 95) / 100 -> 5 instances wanted; max_instances=3 allows two more.
    assert len(out[2]) == 1 and isinstance(out[2][0], ScaleOut) and out[2][0].count == 2


def test_scale_out_sizes_the_step_to_the_load() -> None:
    # Three instances of 100 blocks, each with 10 requests using 95 blocks:
    # the band's middle (35) needs (35 * 30 + 285) / 100 -> 14 instances.
    cfg = replace(CFG, max_instances=8)
    hot = [busy("a"), busy("b"), busy("c")]
    out = run(cfg, *[snap(*hot, now=t) for t in (100, 101, 102)])
    assert out[2] == [ScaleOut(5, out[2][0].reason)]  # capped at max_instances
    cfg = replace(CFG, max_instances=20)
    out = run(cfg, *[snap(*hot, now=t) for t in (100, 101, 102)])
    assert out[2] == [ScaleOut(11, out[2][0].reason)]


def test_a_good_tick_resets_the_count() -> None:
    calm = inst("a", running=2, used=40)  # freeness 30: inside the band
    out = run(CFG, snap(busy("a"), now=1), snap(busy("a"), now=2), snap(calm, now=3),
              snap(busy("a"), now=4), snap(busy("a"), now=5))  # fmt: skip
    assert all(d == [] for d in out)


def test_no_scale_out_while_one_is_starting_or_at_max() -> None:
    starting = InstanceState("b", InstanceStatus.STARTING)
    assert run(CFG, *[snap(busy("a"), starting, now=t) for t in range(5)])[-1] == []
    full = [busy("a"), busy("b"), busy("c")]
    assert run(CFG, *[snap(*full, now=t) for t in range(5)])[-1] == []


def test_cooldown_after_a_change() -> None:
    state = ScalingState(last_change_s=99.0)
    out = run(CFG, *[snap(busy("a"), now=100 + t) for t in range(3)], state=state)
    assert out[-1] == []  # 102 - 99 < 5 s
    out = run(CFG, *[snap(busy("a"), now=110 + t) for t in range(3)], state=state)
    assert isinstance(out[-1][0], ScaleOut)


def test_scale_in_drains_the_instance_cheapest_to_empty() -> None:
    a = inst("a", running=1, used=10)
    b = inst("b", running=1, used=5, high=1)  # lighter, but serves high priority
    c = inst("c", running=1, used=20)
    out = run(CFG, *[snap(a, b, c, now=100 + t) for t in range(2)])
    assert out[-1] == [Drain("a", out[-1][0].reason)]


def test_no_scale_in_when_the_rest_could_not_take_the_load() -> None:
    cfg = replace(CFG, freeness_high=20, freeness_low=15)
    a, b = inst("a", running=2, used=50), inst("b", running=2, used=50)  # freeness 25 each
    # Without one of them: (50 - 50) / 4 = 0 < freeness_low.
    assert run(cfg, *[snap(a, b, now=100 + t) for t in range(3)])[-1] == []


def test_never_below_min_and_replaces_a_lost_instance() -> None:
    cfg = replace(CFG, min_instances=2)
    out = run(cfg, snap(inst("a")))
    assert out == [[ScaleOut(1, out[0][0].reason)]]
    idle = [snap(inst("a"), inst("b"), now=100 + t) for t in range(5)]
    assert all(d == [] for d in run(cfg, *idle))  # two idle, but min is two


def test_drained_instances_are_stopped_once_empty() -> None:
    draining = inst("d", status=InstanceStatus.DRAINING)
    busy_draining = inst("e", running=1, used=10, status=InstanceStatus.DRAINING)
    out = run(CFG, snap(inst("a", running=1, used=10), draining, busy_draining))
    assert [d for d in out[0] if isinstance(d, Stop)] == [Stop("d", "drained: no requests left")]


def test_scale_to_zero_after_the_idle_timeout_and_back_on_demand() -> None:
    cfg = replace(CFG, min_instances=0)
    out = run(cfg, snap(inst("a"), now=100), snap(inst("a"), now=120), snap(inst("a"), now=131))
    assert out[0] == [] and out[1] == []
    assert [type(d) for d in out[2]] == [Drain]
    assert run(cfg, snap(now=200)) == [[]]  # nothing running, nothing asked for
    back = run(cfg, snap(now=300, held=3))[0]
    assert (
        len(back) == 1 and isinstance(back[0], ScaleOut) and "3 request(s) held" in back[0].reason
    )


def test_requests_reset_the_idle_clock() -> None:
    cfg = replace(CFG, min_instances=0)
    out = run(cfg, snap(inst("a"), now=100), snap(inst("a", running=1, used=5), now=120),
              snap(inst("a"), now=140), snap(inst("a"), now=160))  # fmt: skip
    assert all(d == [] for d in out)


def test_config_errors_name_the_values() -> None:
    with pytest.raises(ValueError, match=r"min_instances \(3\) <= max_instances \(2\)"):
        ScalingConfig(min_instances=3, max_instances=2)
    with pytest.raises(ValueError, match="freeness_low"):
        ScalingConfig(freeness_low=50, freeness_high=10)
    with pytest.raises(ValueError, match="unknown scaling policy"):
        SCALING.get("nope")


def test_static_keeps_min_instances() -> None:
    static = SCALING.get("static")
    cfg = replace(CFG, min_instances=2)
    decisions, _ = static(snap(busy("a"), now=1), cfg, ScalingState())
    assert [type(d) for d in decisions] == [ScaleOut]
