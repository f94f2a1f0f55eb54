"""The autoscaler drains a real vLLM instance by live migration: two
streams, one on each of two vLLM CPU instances; the calm that follows scales
in, the drained instance's stream moves (KV transfer) to the other and both
streams finish without an error reaching the client."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from infra.events import DrainEvent, MigratedEvent, StopEvent
from tests.autoscaler.stack import Stack, stream
from tests.helpers import launch_worker, wait_for, wait_ready

pytestmark = pytest.mark.vllm

ENGINE_ARGS = "--max-num-seqs 4 --block-size 32 --kv-cache-bytes 268435456 --max-model-len 16384"
MAX_TOKENS = 8000
"""Long enough (~20 s here) to still run when the scale-in comes."""


def test_calm_drains_a_vllm_instance_by_migration(stack: Stack, tiny_model: Path) -> None:
    env = {"SHOAL_DTYPE": "float32", "HF_HUB_OFFLINE": "1"}
    workers = [launch_worker(  # two instances, started together
        engine="vllm", redis_url=stack.redis_url, namespace=stack.ns,
        log_dir=stack.log_dir, instance_id=f"vllm-{core}", env=env,
        args=["--model", str(tiny_model), "--served-model-name", "tiny-llama",
              "--cpu-threads-bind", str(core), *ENGINE_ARGS.split()],
    ) for core in (0, 1)]  # fmt: skip
    stack.procs.extend(workers)
    wait_ready(workers, timeout_s=300)
    gw = stack.gateway()
    wait_for(lambda: len(stack.active()) == 2, timeout_s=60)
    outs: list[dict[str, Any]] = [{}, {}]
    threads = []
    for i, out in enumerate(outs):  # the second goes to the instance the first left idle
        t = threading.Thread(target=stream, args=(gw.base_url, [1, 40 + i, 41, 42], MAX_TOKENS,
                                                  out, "tiny-llama"))  # fmt: skip
        t.start()
        threads.append(t)
        wait_for(lambda i=i: sum(v.load.num_running for v in stack.active() if v.load) > i,  # type: ignore[misc]
                 timeout_s=60)  # fmt: skip
    # Now an autoscaler: two instances running one request each is a calm
    # (freeness far above the band) with min_instances=1, so it scales in.
    stack.autoscaler(
        "as-vllm", "--min-instances", "1", "--max-instances", "2", "--model", str(tiny_model),
        "--served-model-name", "tiny-llama", "--instance-args", ENGINE_ARGS,
        "--scale-in-ticks", "4", engine="vllm", env=env,
    )  # fmt: skip
    wait_for(lambda: len(stack.instances()) == 1, timeout_s=120)  # scaled in
    for t in threads:
        t.join(timeout=300)
    for out in outs:
        assert out["status"] == 200 and "error" not in out, out
        assert out["usage"]["completion_tokens"] == MAX_TOKENS and out["done"] == 1, out
    events = stack.events()
    drained = [e.payload.instance_id for e in events if isinstance(e.payload, DrainEvent)]
    moved = [e.payload for e in events
             if isinstance(e.payload, MigratedEvent) and e.payload.source in drained]  # fmt: skip
    assert len(drained) == 1 and any("migrated" in m.outcomes for m in moved), events
    assert [e.payload.instance_id for e in events if isinstance(e.payload, StopEvent)] == drained
    assert not any(e.kind == "scale_out" for e in events)  # it adopted both
