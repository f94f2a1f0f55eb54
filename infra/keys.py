"""Redis key schema. Every key lives under one namespace (default ``shoal``).

======================  ======================  ==========================================
key                     type / record           meaning
======================  ======================  ==========================================
``<ns>:instances``      set of instance ids     index of registered instances
``<ns>:instance:<id>``  string / InstanceInfo   registry entry, expires with the heartbeat
``<ns>:load:<id>``      string / LoadReport     latest load report, expires likewise
``<ns>:reserved:<id>``  sorted set              in-flight reservations (request id -> dispatch ms)
``<ns>:apikeys``        hash / ApiKey           API keys by SHA-256 of the key
``<ns>:rl:<key>:<kind>:<minute>``  counter      rate-limit window (requests or tokens)
``<ns>:held``           sorted set              requests gateways hold for lack of an instance
                                                (request id -> unix ms); the autoscaler's demand
``<ns>:scalable``       string / JSON list      models an autoscaler can start (expires)
``<ns>:leader``         string                  holder of the autoscaler lease (expires)
``<ns>:autoscaler``     string / JSON           the leader's state for ``shoal status`` (expires)
``<ns>:events``         stream                  autoscaler decisions and outcomes (capped)
``<ns>:traffic``        stream / TrafficBatch   gateways' arrivals and latencies (capped)
======================  ======================  ==========================================

An id in the index whose ``instance`` key has expired is dead; readers prune it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeySchema:
    namespace: str = "shoal"

    @property
    def instances_index(self) -> str:
        return f"{self.namespace}:instances"

    def instance(self, instance_id: str) -> str:
        return f"{self.namespace}:instance:{instance_id}"

    def load(self, instance_id: str) -> str:
        return f"{self.namespace}:load:{instance_id}"

    def reserved(self, instance_id: str) -> str:
        return f"{self.namespace}:reserved:{instance_id}"

    @property
    def api_keys(self) -> str:
        return f"{self.namespace}:apikeys"

    def rate_window(self, key_name: str, kind: str, minute: int) -> str:
        return f"{self.namespace}:rl:{key_name}:{kind}:{minute}"

    @property
    def held(self) -> str:
        return f"{self.namespace}:held"

    @property
    def scalable(self) -> str:
        return f"{self.namespace}:scalable"

    @property
    def leader(self) -> str:
        return f"{self.namespace}:leader"

    @property
    def autoscaler(self) -> str:
        return f"{self.namespace}:autoscaler"

    @property
    def events(self) -> str:
        return f"{self.namespace}:events"

    @property
    def traffic(self) -> str:
        return f"{self.namespace}:traffic"
