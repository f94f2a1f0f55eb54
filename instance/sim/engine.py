"""The sim engine in wall-clock time: drives ``SimCore`` from an asyncio task,
sleeping each step's modelled duration, and streams tokens to callers. With
:class:`SimKvOptions` it has a KV port (``instance.sim.kv``) and migrates by
KV transfer; without, by recompute."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable

from infra.contract import SamplingSpec
from infra.errors import BadRequestError
from instance.engine import EngineLimits, EngineLoad, EngineRequest, TokenDelta
from instance.sim.codec import ByteTokenizer
from instance.sim.core import SimConfig, SimCore, SimOutput
from instance.sim.kv import SimKvOptions, SimKvPort, Sleep

log = logging.getLogger(__name__)


class SimEngine:
    """``Engine`` implementation over :class:`SimCore` (wall-clock driver)."""

    kind = "sim"

    output_parsing = None
    """The sim engine runs no tool-call parser."""

    def check(self, sampling: SamplingSpec) -> None:
        """A modelled engine: its tokens come from no distribution, so it has
        no logprobs, and no grammar can steer them."""
        if sampling.logprobs is not None:
            raise BadRequestError("the sim engine has no token logprobs", param="logprobs")
        if sampling.prompt_logprobs is not None:
            raise BadRequestError("the sim engine has no token logprobs",
                                  param="prompt_logprobs")  # fmt: skip
        if sampling.structured is not None:
            raise BadRequestError("the sim engine has no structured outputs",
                                  param="structured_outputs")  # fmt: skip

    def __init__(
        self,
        config: SimConfig,
        *,
        max_model_len: int,
        sleep: Sleep = asyncio.sleep,
        kv: SimKvOptions | None = None,
        kv_sleep: Sleep | None = None,
        startup_s: float = 0.0,
    ) -> None:
        """``sleep`` waits each step's modelled duration; ``kv_sleep`` (default
        ``sleep``) waits each KV stage's modelled transfer time; ``startup_s``
        models the engine's start-up (loading weights) before it serves."""
        self._startup_s = startup_s
        self.core = SimCore(config)
        self.tokenizer = ByteTokenizer()
        self.limits = EngineLimits(
            block_size=config.block_size,
            num_blocks_total=config.num_blocks,
            max_num_seqs=config.max_num_seqs,
            max_model_len=max_model_len,
            platform="sim",
        )
        self._sleep = sleep
        self._queues: dict[str, asyncio.Queue[SimOutput | None]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None
        self.steps: list[tuple[str, ...]] = []
        """Batches run so far (kept for tests comparing drivers); bounded."""
        self.kv_port: SimKvPort | None = (
            SimKvPort(self.core, kv, sleep=kv_sleep or sleep) if kv is not None else None
        )
        """KV transfer for migration, or None (the sim migrates by recompute)."""

    async def start(self) -> None:
        if self._startup_s > 0:
            await self._sleep(self._startup_s)
        if self.kv_port is not None:
            await self.kv_port.start()
        self._task = asyncio.create_task(self._loop(), name="sim-engine")

    async def stop(self) -> None:
        if self.kv_port is not None:
            await self.kv_port.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for queue in self._queues.values():
            queue.put_nowait(None)

    @property
    def healthy(self) -> bool:
        return self._failed is None and self._task is not None and not self._task.done()

    def load(self) -> EngineLoad:
        return self.core.load()

    async def abort(self, request_id: str) -> bool:
        aborted = self.core.abort(request_id)
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(None)
        return aborted

    async def generate(
        self, request: EngineRequest, admitted: Callable[[], None] = lambda: None
    ) -> AsyncGenerator[TokenDelta, None]:
        queue: asyncio.Queue[SimOutput | None] = asyncio.Queue()
        self._queues[request.request_id] = queue
        self.core.add(request)
        admitted()
        self._wake.set()
        num_prompt = len(request.prompt_token_ids)
        num_output = 0
        finished = False
        try:
            while True:
                out = await queue.get()
                if out is None:
                    finished = True
                    yield TokenDelta((), "", num_prompt, num_output, finish_reason="abort")
                    return
                num_output += 1
                finished = out.finish_reason is not None
                yield TokenDelta(
                    token_ids=(out.token_id,),
                    text=self.tokenizer.decode([out.token_id]),
                    num_prompt_tokens=num_prompt,
                    num_output_tokens=num_output,
                    finish_reason=out.finish_reason,
                )
                if finished:
                    return
        finally:
            self._queues.pop(request.request_id, None)
            if not finished:
                self.core.abort(request.request_id)

    async def _loop(self) -> None:
        try:
            while True:
                if not self.core.has_work:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                step = self.core.step()
                if len(self.steps) < 100_000:
                    self.steps.append(step.batch)
                await self._sleep(step.duration_s)
                for out in step.outputs:
                    queue = self._queues.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(out)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the engine died: fail every stream
            log.exception("sim engine loop failed")
            self._failed = exc
            for queue in self._queues.values():
                queue.put_nowait(None)
            raise
