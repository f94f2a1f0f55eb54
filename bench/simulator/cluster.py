"""The cluster simulator: N ``SimCore`` instances in virtual time, driven by
the live system's policies (dispatch, scaling, pairing, request selection),
imported from their registries and never re-implemented here.

Events (``events.EventQueue``):

* arrival: the dispatch policy ranks the active instances (their load
  reports built by ``instance.reporter.make_report``) and the request joins
  the best one's engine; with no active instance it is held, and the scaling
  policy sees it as ``num_held``;
* step: an instance with work runs one ``SimCore.step()``; its outputs are
  delivered when the step's modelled duration has passed, then the next step
  starts (an idle instance schedules nothing);
* tick (every ``tick_s``): a ``Snapshot`` of every instance goes to
  ``autoscaler.policies.decide`` (start timeouts, then the scaling and
  pairing policies), as in the autoscaler's controller, and the decisions
  are executed: ``ScaleOut`` (active after the cold start), ``StopStarting``
  (an instance whose cold start outlasts ``ScalingConfig.start_timeout_s``
  never becomes active), ``Drain``, ``Stop`` (only an empty instance) and
  ``Migrate`` (``migration.Migrations``).
"""

from __future__ import annotations

import random
import time
from collections import Counter, deque
from collections.abc import Sequence
from functools import partial

from autoscaler.decisions import Decision, Drain, Migrate, ScaleOut, Stop, StopStarting
from autoscaler.policies import PAIRING, SCALING, ScalingState, TickPolicies, decide
from autoscaler.snapshot import InstanceState, Snapshot
from bench.loadgen import TimelineSample
from bench.simulator.config import SimulationConfig
from bench.simulator.events import EventQueue
from bench.simulator.instance import SimInstance
from bench.simulator.migration import Migrations
from bench.simulator.requests import RequestState
from bench.simulator.results import SimulationResult, collect
from bench.traces import TraceRequest
from gateway.policies import DispatchContext, DispatchRequest, make_policy
from infra.records import InstanceStatus
from infra.traffic import TrafficLog
from instance.engine import KvLoad
from instance.sim.core import SimStep


class Simulator:
    """One run: build it with a trace and a config, then :meth:`run`."""

    def __init__(self, trace: Sequence[TraceRequest], config: SimulationConfig) -> None:
        self.config = config
        self.queue = EventQueue()
        self._dispatch = make_policy(config.dispatch)
        self._policies = TickPolicies(
            SCALING.get(config.scaling), config.scaling_config,
            PAIRING.get(config.pairing) if config.migration else None, config.pairing_config,
        )  # fmt: skip
        self.scaling_state = ScalingState()
        self.migrations = Migrations(self, config)
        self.instances: dict[str, SimInstance] = {}
        self.requests = [
            RequestState(i, r, honour_priority=config.priorities) for i, r in enumerate(trace)
        ]
        self._by_engine_id: dict[str, RequestState] = {}
        self.held: deque[RequestState] = deque()
        self.traffic = TrafficLog()
        """What the gateways would record: the ``slo`` policy's demand and SLO view."""
        self._rng = random.Random(config.seed)
        self._num_dispatched = 0
        self._num_launched = 0
        self._num_arrived = 0
        self._num_done = 0
        self.num_held_total = 0
        self.decisions: Counter[str] = Counter()
        self.timeline: list[TimelineSample] = []
        self.instance_seconds = 0.0
        self.max_instances = 0
        self._accounted_at = 0.0
        self.end_s = 0.0

    # -- the run -------------------------------------------------------------
    def run(self) -> SimulationResult:
        t0 = time.perf_counter()
        for _ in range(self.config.num_instances):
            self._launch(0.0, InstanceStatus.ACTIVE)
        for req in sorted(self.requests, key=lambda r: (r.arrival_s, r.index)):
            self.queue.at(req.arrival_s, partial(self._arrive, req))
        self.queue.at(0.0, self._tick)
        self.queue.run(lambda: self._num_done == len(self.requests), self.config.max_events)
        self._account(self.end_s)
        return collect(self, wall_s=time.perf_counter() - t0)

    # -- SimInstance bookkeeping (also the migrations' Cluster) --------------
    def instance(self, instance_id: str) -> SimInstance | None:
        return self.instances.get(instance_id)

    def running_requests(self, instance: SimInstance) -> list[RequestState]:
        return [self._by_engine_id[r.request_id] for r in instance.core.load().running]

    def detach(self, request: RequestState, now: float) -> None:
        assert request.engine_id is not None
        del self._by_engine_id[request.engine_id]
        request.instance_id = None
        request.stopped_at = now

    def place(
        self, request: RequestState, instance: SimInstance, kv: KvLoad | None, now: float
    ) -> None:
        engine_request = request.next_segment(kv)
        instance.core.add(engine_request)
        instance.version += 1
        self._by_engine_id[engine_request.request_id] = request
        request.instance_id = instance.instance_id
        self.wake(instance, now)

    def wake(self, instance: SimInstance, now: float) -> None:
        """Schedule a step now if the instance has work and none is scheduled."""
        if not instance.stepping and instance.core.has_work:
            instance.stepping = True
            self.queue.at(now, partial(self._on_step, instance))

    def _launch(self, now: float, status: InstanceStatus) -> SimInstance:
        self._account(now)
        self._num_launched += 1
        inst = SimInstance(f"sim-{self._num_launched:03d}", self.config.hardware, status, now)
        self.instances[inst.instance_id] = inst
        self.max_instances = max(self.max_instances, len(self.instances))
        return inst

    def _account(self, now: float) -> None:
        """Instance-seconds: every instance that exists costs, starting or not."""
        self.instance_seconds += (now - self._accounted_at) * len(self.instances)
        self._accounted_at = now

    # -- requests ------------------------------------------------------------
    def _arrive(self, req: RequestState, now: float) -> None:
        self._num_arrived += 1
        trace = req.trace
        self.traffic.arrived(now)
        if not self.config.hardware.fits(trace.prompt_tokens + trace.output_tokens):
            req.error = (f"{trace.prompt_tokens} + {trace.output_tokens} tokens exceed an "
                         f"instance's {self.config.hardware.max_request_tokens}")  # fmt: skip
            self._finish(req, now)
            return
        self._dispatch_one(req, now)

    def _dispatch_one(self, req: RequestState, now: float) -> None:
        cfg = self.config
        active = [i for i in self.instances.values() if i.status is InstanceStatus.ACTIVE]
        if not active:
            self.held.append(req)
            self.num_held_total += 1
            return
        candidates = [i.candidate(now, cfg.report_interval_s, cfg.headroom_blocks) for i in active]
        ctx = DispatchContext(DispatchRequest(req.priority, req.trace.prompt_tokens), candidates,
                              tick=self._num_dispatched, rng=self._rng)  # fmt: skip
        best = self.instances[self._dispatch.rank(ctx)[0].instance_id]
        self._num_dispatched += 1
        best.num_reserved += 1
        self.place(req, best, None, now)

    def _finish(self, req: RequestState, now: float) -> None:
        if req.error is None:
            req.finish_s = now
            self.traffic.served(now, req.num_tokens)
            if req.first_token_s is not None and req.num_output > 1:
                tpot = (now - req.first_token_s) / (req.num_output - 1)
                self.traffic.finished(now, req.priority, tpot)
            req.instance_id = req.engine_id = None
        self._num_done += 1
        self.end_s = max(self.end_s, now)

    # -- engine steps --------------------------------------------------------
    def _on_step(self, inst: SimInstance, now: float) -> None:
        """Deliver the step that ends now, run pending stops, start the next."""
        if inst.pending is not None:
            self._deliver(inst.pending, now)
            inst.pending = None
        if inst.at_step_end:
            stops, inst.at_step_end = inst.at_step_end, []
            for stop in stops:
                stop(now)
        if not inst.core.has_work:
            inst.stepping = False
            return
        step = inst.core.step()
        inst.version += 1
        if step.duration_s <= 0:  # nothing could run (blocks pinned): wait for a change
            inst.stepping = False
            return
        for engine_id in step.preempted:
            self._by_engine_id[engine_id].on_preempted(now)
        inst.pending = step
        self.queue.at(now + step.duration_s, partial(self._on_step, inst))

    def _deliver(self, step: SimStep, now: float) -> None:
        by_id = self._by_engine_id
        for out in step.outputs:
            req = by_id[out.request_id]
            first = req.first_token_s is None
            req.on_token(now)
            if first:
                self.traffic.first_token(now, req.priority, now - req.arrival_s)
            if out.finish_reason is not None:
                del by_id[out.request_id]
                self._finish(req, now)

    # -- autoscaler ticks ----------------------------------------------------
    def _tick(self, now: float) -> None:
        snap = self._snapshot(now)
        decisions, self.scaling_state = decide(snap, self._policies, self.scaling_state)
        for decision in decisions:
            self._execute(decision, now)
        self._sample(now)
        self.queue.at(now + self.config.tick_s, self._tick)

    def _snapshot(self, now: float) -> Snapshot:
        cfg = self.config
        states = tuple(
            InstanceState(
                i.instance_id, i.status,
                None if i.status is InstanceStatus.STARTING
                else i.report(now, cfg.report_interval_s, cfg.headroom_blocks),
                i.started_at,
            )
            for i in self.instances.values()
        )  # fmt: skip
        return Snapshot(now, states, len(self.held), frozenset(self.migrations.busy),
                        self.traffic.summary(now))  # fmt: skip

    def _execute(self, decision: Decision, now: float) -> None:
        self.decisions[type(decision).__name__] += 1
        match decision:
            case ScaleOut(count=count):
                for _ in range(count):
                    starting = self._launch(now, InstanceStatus.STARTING)
                    ready_s = now + self.config.effective_cold_start_s
                    self.queue.at(ready_s, partial(self._activate, starting))
            case Drain(instance_id=instance_id):
                inst = self.instances.get(instance_id)
                if inst is not None and inst.status is InstanceStatus.ACTIVE:
                    inst.set_status(InstanceStatus.DRAINING)
            case Stop(instance_id=instance_id):
                inst = self.instances.get(instance_id)
                if inst is not None and inst.is_empty and instance_id not in self.migrations.busy:
                    self._remove(inst, now)
            case StopStarting(instance_id=instance_id):
                inst = self.instances.get(instance_id)
                if inst is not None and inst.status is InstanceStatus.STARTING:
                    self._remove(inst, now)
            case Migrate():
                self.migrations.start(decision, now)

    def _remove(self, inst: SimInstance, now: float) -> None:
        self._account(now)
        del self.instances[inst.instance_id]

    def _activate(self, inst: SimInstance, now: float) -> None:
        """Cold start over: the instance serves, held requests go first
        (unless it was stopped meanwhile: a start timeout)."""
        if self.instances.get(inst.instance_id) is not inst:
            return
        inst.set_status(InstanceStatus.ACTIVE)
        held, self.held = self.held, deque()
        for req in held:
            self._dispatch_one(req, now)

    def _sample(self, now: float) -> None:
        num_active = sum(i.status is InstanceStatus.ACTIVE for i in self.instances.values())
        in_flight = self._num_arrived - self._num_done
        sample = TimelineSample(now, in_flight, self._num_done, len(self.instances), num_active)
        self.timeline.append(sample)
