"""Pairing policies: ``policy(snapshot, config) -> [Migrate]``.

``llumnix`` (the default), in order of urgency, with at most one migration
in or out of any instance at a time:

1. drain: requests leave draining instances for the freest active ones;
2. priorities: an instance serving high-priority requests sheds normal and
   low ones (lowest priority first) while its freeness is below
   ``protect_above``, so the high-priority batch stays small;
3. balance: the least free instances (freeness below ``migrate_out_below``)
   are paired with the freest (above ``migrate_in_above``), Llumnix-style.

``none`` never migrates (load-aware dispatch alone, the INFaaS++ baseline),
except to drain, which would otherwise wait for requests to finish.

Which requests a ``Migrate`` may take from its source is one rule,
:func:`may_move_high`, that the controller and the simulator both apply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from autoscaler.decisions import Migrate
from autoscaler.snapshot import InstanceState, Snapshot
from infra.records import InstanceStatus
from infra.registry import Registry


@dataclass(frozen=True)
class PairingConfig:
    """The pairing policies' knobs. Each field of ``AutoscalerSettings`` with
    the same name sets it (``autoscaler.main.controller_config``)."""

    migrate_out_below: float = 5.0
    """An instance this short of free blocks per request sends requests away."""
    migrate_in_above: float = 40.0
    """An instance this free may receive them."""
    protect_above: float = 80.0
    """Freeness an instance with high-priority requests is kept above."""
    drain_batch: int = 4
    """Requests moved per migration call out of a draining instance."""


def may_move_high(source_status: InstanceStatus) -> bool:
    """Whether a migration out of an instance in ``source_status`` may pick
    high-priority requests: only when it drains (everything must leave);
    otherwise high priority stays where it runs and the others make room."""
    return source_status is InstanceStatus.DRAINING


PairingPolicy = Callable[[Snapshot, PairingConfig], list[Migrate]]
PAIRING: Registry[PairingPolicy] = Registry("pairing policy")


class _Pairs:
    """Migrations chosen so far; each instance in at most one."""

    def __init__(self, snap: Snapshot) -> None:
        self.busy = set(snap.migrating)
        self.chosen: list[Migrate] = []

    def free(self, instances: list[InstanceState]) -> list[InstanceState]:
        return [i for i in instances if i.instance_id not in self.busy]

    def add(self, m: Migrate) -> None:
        self.busy |= {m.source, m.destination}
        self.chosen.append(m)


def _freest(instances: list[InstanceState]) -> list[InstanceState]:
    return sorted(instances, key=lambda i: (-i.freeness, i.instance_id))


def _drain(snap: Snapshot, cfg: PairingConfig, pairs: _Pairs) -> None:
    for src in pairs.free([i for i in snap.draining if i.num_requests > 0]):
        targets = pairs.free(_freest(snap.active))
        if targets:
            pairs.add(
                Migrate(
                    src.instance_id,
                    targets[0].instance_id,
                    cfg.drain_batch,
                    f"draining: {src.num_requests} request(s) left",
                )
            )


def _protect_high(snap: Snapshot, cfg: PairingConfig, pairs: _Pairs) -> None:
    crowded = [
        i
        for i in snap.active
        if i.num_high > 0 and i.num_requests > i.num_high and i.freeness < cfg.protect_above
    ]
    for src in pairs.free(sorted(crowded, key=lambda i: i.freeness)):
        targets = pairs.free(
            [
                t
                for t in _freest(snap.active)
                if t.num_high == 0 and t is not src and t.freeness > cfg.migrate_in_above
            ]
        )
        if targets:
            pairs.add(
                Migrate(
                    src.instance_id,
                    targets[0].instance_id,
                    1,
                    f"protecting {src.num_high} high-priority request(s) "
                    f"(freeness {src.freeness:.1f})",
                    selection="lowest-priority",
                )
            )


def _balance(snap: Snapshot, cfg: PairingConfig, pairs: _Pairs) -> None:
    sources = [
        i
        for i in sorted(snap.active, key=lambda i: (i.freeness, i.instance_id))
        if i.freeness < cfg.migrate_out_below and i.num_requests > 1
    ]
    targets = [i for i in _freest(snap.active) if i.freeness > cfg.migrate_in_above]
    for src, dst in zip(pairs.free(sources), pairs.free(targets), strict=False):
        if src.instance_id in pairs.busy or dst.instance_id in pairs.busy or src is dst:
            continue
        pairs.add(
            Migrate(
                src.instance_id,
                dst.instance_id,
                1,
                f"balancing: freeness {src.freeness:.1f} -> {dst.freeness:.1f}",
            )
        )


@PAIRING.register("llumnix", default=True)
def llumnix(snap: Snapshot, cfg: PairingConfig) -> list[Migrate]:
    pairs = _Pairs(snap)
    _drain(snap, cfg, pairs)
    _protect_high(snap, cfg, pairs)
    _balance(snap, cfg, pairs)
    return pairs.chosen


@PAIRING.register("none")
def drain_only(snap: Snapshot, cfg: PairingConfig) -> list[Migrate]:
    pairs = _Pairs(snap)
    _drain(snap, cfg, pairs)
    return pairs.chosen
