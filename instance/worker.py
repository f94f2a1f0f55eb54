"""The instance worker's logic: validates requests, drives the engine, keeps
the instance's registry entry and load report current. HTTP lives in
``instance.server``; this module knows nothing of it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hmac
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass

from infra.contract import (
    Continuation,
    GenerateChunk,
    GenerateRequest,
    PromptLogprob,
    Usage,
)
from infra.errors import (
    BadRequestError,
    ContextLengthError,
    ErrorDetail,
    NotFoundError,
    ServiceUnavailableError,
)
from infra.records import InstanceInfo, InstanceStatus
from infra.store import StateStore
from instance.engine import Engine, EngineRequest, TokenDelta, chat_messages
from instance.generation import Generation
from instance.metrics import InstanceMetrics
from instance.output_parsing import session_for
from instance.reporter import LoadReporter, ReporterConfig
from instance.text import TextStream, special_tokens
from migration.protocol import ResumeSpec

log = logging.getLogger(__name__)

_Parked = tuple["asyncio.Queue[GenerateChunk | None]", "asyncio.Task[None]", str | None]
"""A migrated-in request waiting for its client: its chunks, the task that
runs it, and its resume token."""


@dataclass(frozen=True)
class WorkerConfig:
    """What an instance worker is (from its settings, see ``instance.main``)."""

    instance_id: str
    """Its id in the registry."""
    address: str
    """Base URL other components reach it at."""
    served_model_name: str
    """The model name clients ask for."""
    report: ReporterConfig
    """How it publishes its load."""
    vocab_size: int | None = None
    """Token ids in prompts are checked against it (None: unchecked)."""
    health_check_interval_s: float = 0.5
    """How often the engine's health is checked; a dead engine deregisters."""
    resume_timeout_s: float = 60.0
    """A migrated-in request nobody resumes within this long of its hand-off
    is aborted (its client is gone)."""


class InstanceWorker:
    def __init__(
        self,
        engine: Engine,
        config: WorkerConfig,
        store: StateStore | None,
        metrics: InstanceMetrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.config = config
        self.store = store
        self.metrics = metrics
        self._clock = clock
        self._status = InstanceStatus.STARTING
        self._started_at = clock()
        self._generations: dict[str, Generation] = {}
        self._parked: dict[str, _Parked] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.unhealthy_reason: str | None = None
        self.reporter = LoadReporter(engine, store, self.info, config.report, metrics, clock=clock)

    # -- lifecycle --------------------------------------------------------
    @property
    def status(self) -> InstanceStatus:
        return self._status

    def set_status(self, status: InstanceStatus) -> None:
        log.info("instance %s: %s -> %s", self.config.instance_id, self._status, status)
        self._status = status

    def check_model(self, model: str | None) -> None:
        """A 404 unless ``model`` (when given) is the one served here."""
        if model is not None and model != self.config.served_model_name:
            raise NotFoundError(
                f"model {model!r} is not served here (serving "
                f"{self.config.served_model_name!r})", param="model", code="model_not_found",
            )  # fmt: skip

    def info(self) -> InstanceInfo:
        limits = self.engine.limits
        return InstanceInfo(
            instance_id=self.config.instance_id,
            address=self.config.address,
            model=self.config.served_model_name,
            engine=self.engine.kind,
            status=self._status,
            pid=os.getpid(),
            hostname=socket.gethostname(),
            started_at=self._started_at,
            block_size=limits.block_size,
            num_blocks_total=limits.num_blocks_total,
            max_num_seqs=limits.max_num_seqs,
            max_model_len=limits.max_model_len,
            kv_capacity_tokens=limits.capacity_tokens,
            platform=limits.platform,
            devices=limits.devices,
            engine_args=limits.engine_args,
        )

    async def start(self) -> None:
        await self.engine.start()
        # Everything imported and built so far (torch, vLLM, the tokenizer:
        # millions of objects) lives for the whole process. Moving it out of
        # the collector's reach keeps full collections from pausing the event
        # loop for seconds while requests stream (as vLLM's own server does).
        gc.collect()
        gc.freeze()
        self.set_status(InstanceStatus.ACTIVE)
        self._tasks = [
            asyncio.create_task(self.reporter.run(self._stop), name="load-reporter"),
            asyncio.create_task(self._watch_engine(), name="engine-watchdog"),
        ]

    async def stop(self) -> None:
        self.set_status(InstanceStatus.STOPPED)
        self._stop.set()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._deregister()
        await self.engine.stop()

    @property
    def healthy(self) -> bool:
        return self.unhealthy_reason is None and self.engine.healthy

    async def _watch_engine(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(self.config.health_check_interval_s)
            if not self.engine.healthy:
                self.unhealthy_reason = "engine died"
                log.error("engine of %s died: deregistering", self.config.instance_id)
                self.set_status(InstanceStatus.STOPPED)
                self._stop.set()
                await self._deregister()
                return

    async def _deregister(self) -> None:
        if self.store is None:
            return
        try:
            await self.store.deregister(self.config.instance_id)
        except Exception as exc:
            log.warning("could not deregister %s: %s", self.config.instance_id, exc)

    # -- requests ---------------------------------------------------------
    def prepare(self, req: GenerateRequest) -> EngineRequest:
        """Validate and tokenise; raise a user error for anything we refuse."""
        if not self.healthy:
            raise ServiceUnavailableError(f"instance is unhealthy: {self.unhealthy_reason}")
        if (
            self._status is not InstanceStatus.ACTIVE
            and self._status is not InstanceStatus.DRAINING
        ):
            raise ServiceUnavailableError(f"instance is {self._status.value}")
        self.check_model(req.model)
        self.check_token_ids(req.stop_token_ids, "stop_token_ids")
        self.check_token_ids(list(req.logit_bias), "logit_bias")
        prompt_ids = self._tokenize(req)
        if req.truncate_prompt_tokens is not None:  # vLLM's: keep the last ones
            prompt_ids = prompt_ids[-req.truncate_prompt_tokens :]
        max_len = self.engine.limits.max_model_len
        if len(prompt_ids) >= max_len:
            raise ContextLengthError(
                f"prompt has {len(prompt_ids)} tokens; this model's context is {max_len} tokens",
                param="messages" if req.messages is not None else "prompt",
            )
        max_tokens = req.max_tokens if req.max_tokens is not None else max_len - len(prompt_ids)
        if len(prompt_ids) + max_tokens > max_len:
            raise ContextLengthError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                f"the context of {max_len} tokens", param="max_tokens",
            )  # fmt: skip
        parser = session_for(self.engine.output_parsing, req, prompt_ids)
        sampling = req.sampling(max_tokens)
        if parser is not None and parser.structured is not None:  # the tool choice's, as vLLM's
            sampling = sampling.model_copy(update={"structured": parser.structured})
        self.engine.check(sampling)
        if req.continuation is not None:
            self._check_continuation(req.continuation, max_tokens)
            if sampling.structured is not None or parser is not None:  # its state would restart
                raise BadRequestError("a request with structured outputs or a parsed output "
                                      "cannot be continued on another instance",
                                      param="continuation")  # fmt: skip
        request_id = req.request_id or f"req-{uuid.uuid4().hex}"
        if request_id in self._generations:
            raise BadRequestError(
                f"request id {request_id!r} is already in use", param="request_id"
            )
        return EngineRequest(
            request_id=request_id,
            prompt_token_ids=tuple(prompt_ids),
            sampling=sampling,
            priority=req.priority,
            arrival_time=self._clock(),
            parser=parser,
        )

    def _check_continuation(self, cont: Continuation, max_tokens: int) -> None:
        vocab = self.config.vocab_size
        if any(t < 0 or (vocab is not None and t >= vocab) for t in cont.output_token_ids):
            raise BadRequestError(f"token ids must be in [0, {vocab})",
                                  param="continuation.output_token_ids")  # fmt: skip
        if len(cont.output_token_ids) >= max_tokens:
            raise BadRequestError("the continuation leaves no tokens to generate",
                                  param="continuation")  # fmt: skip

    def _tokenize(self, req: GenerateRequest) -> list[int]:
        tok = self.engine.tokenizer
        if req.messages is not None:
            tools = [t.model_dump(exclude_none=True) for t in req.tools or ()]
            return tok.apply_chat_template(chat_messages(req.messages), tools or None,
                                           req.template_kwargs())  # fmt: skip
        if isinstance(req.prompt, str):
            ids = tok.encode(req.prompt)
            if not ids:
                raise BadRequestError("'prompt' encodes to no tokens", param="prompt")
            return ids
        assert req.prompt is not None
        self.check_token_ids(req.prompt, "prompt")
        return list(req.prompt)

    def check_token_ids(self, token_ids: Sequence[int], param: str) -> None:
        """A 400 unless every id is in the model's vocabulary."""
        vocab = self.config.vocab_size
        if any(t < 0 or (vocab is not None and t >= vocab) for t in token_ids):
            raise BadRequestError(f"token ids must be in [0, {vocab})", param=param)

    async def run(
        self, request: EngineRequest, generation: Generation | None = None, *,
        migratable: bool = False, continuation: Continuation | None = None,
        resume_token: str | None = None,
    ) -> AsyncGenerator[GenerateChunk, None]:  # fmt: skip
        """Generate, yielding one chunk per engine delta. Closing the iterator
        aborts the request in the engine. A migration may freeze the request
        mid-way: the stream then ends with a ``migrated`` chunk, or carries on
        here if the migration rolled back. A ``continuation`` (a replayed
        request) starts after the output its client has, like a request
        migrated in by recompute."""
        gen = generation or Generation(
            request, num_prompt_tokens=len(request.prompt_token_ids), migratable=migratable,
            resume_token=resume_token,
        )  # fmt: skip
        if continuation is not None:
            gen.continue_after(continuation.output_token_ids, continuation.emitted_chars)
        if gen.text is None:
            await self._start_text(gen)
        rid, priority = gen.request_id, request.priority.value
        if gen.migratable and gen.pinned_by is not None:
            self.metrics.unmigratable.labels(gen.pinned_by).inc()
        self._generations[rid] = gen
        latency = _Latency(self.metrics, priority, request.arrival_time)
        finish: str | None = None
        try:
            while finish is None:
                if gen.num_remaining <= 0:  # every token is out, only its end was not
                    finish = "length"
                    yield self._last_chunk(gen)
                    break
                async with contextlib.aclosing(self._segment(gen, latency)) as chunks:
                    async for chunk in chunks:
                        finish = chunk.finish_reason
                        yield chunk
                if not gen.frozen:
                    finish = finish or "abort"  # the engine ended it without a reason
                elif (destination := await gen.outcome()) is not None:
                    finish = "migrated"
                    yield GenerateChunk(request_id=rid, migrated_to=destination)
        finally:
            gen.finished = True
            if self._generations.get(rid) is gen:
                del self._generations[rid]
            self.metrics.requests.labels(priority, finish or "abort").inc()
            if finish not in (None, "migrated", "abort"):
                self.metrics.e2e.labels(priority).observe(self._clock() - request.arrival_time)

    async def _segment(
        self, gen: Generation, latency: _Latency
    ) -> AsyncGenerator[GenerateChunk, None]:
        """The chunks of one engine request of ``gen``, until it ends or
        the request is frozen for a migration."""

        def admitted() -> None:
            gen.admitted.set()
            self.reporter.admitted(gen.request_id)

        deltas = self.engine.generate(gen.next_segment(), admitted)
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                if gen.frozen:
                    continue  # the destination produces these again
                if delta.token_ids:
                    latency.tokens_at(self._clock())
                chunk = self._chunk(gen, delta)
                yield chunk
                if chunk.finish_reason is not None:
                    return  # a stop string in the text ends it (closing aborts the engine's)

    async def _start_text(self, gen: Generation) -> None:
        """Start the request's text; after output from elsewhere (a replay),
        replay that output through it, off the event loop."""
        tok, prompt = self.engine.tokenizer, gen.request.prompt_token_ids
        special = special_tokens(gen.request.sampling)
        if not gen.earlier_output:
            gen.text = TextStream.start(tok, prompt, **special)
            return
        gen.text, text = await asyncio.to_thread(
            functools.partial(TextStream.replayed, tok, prompt, gen.earlier_output, **special)
        )
        chars = len(text)
        held = text[gen.emitted_chars :]  # made, not yet sent: it may begin a stop string
        if gen.emitted_chars <= chars and len(held) <= gen.stops.keep:
            gen.stops.held = held
        else:
            log.warning("%s: the client has %d characters, its tokens make %d: the text may "
                        "not line up", gen.request_id, gen.emitted_chars, chars)  # fmt: skip

    def _last_chunk(self, gen: Generation) -> GenerateChunk:
        """The end of a request whose tokens are all out (its engine request
        was stopped for a migration that rolled back after the last token)."""
        return self._chunk(gen, TokenDelta((), "", gen.num_prompt_tokens, gen.num_output,
                                           finish_reason="length"))  # fmt: skip

    def _chunk(self, gen: Generation, delta: TokenDelta) -> GenerateChunk:
        assert gen.text is not None
        gen.delivered.extend(delta.token_ids)
        text = gen.stops.push(gen.text.push(delta.token_ids))
        finish = "stop" if gen.stops.hit is not None else delta.finish_reason
        usage = None
        if finish is not None:
            text += gen.stops.push(gen.text.flush())
            text += gen.stops.flush()
            gen.finished = True
            usage = Usage(prompt_tokens=gen.num_prompt_tokens, completion_tokens=gen.num_output,
                          total_tokens=gen.num_prompt_tokens + gen.num_output)  # fmt: skip
        gen.emitted_chars += len(text)
        message = parsed = reasoning = None
        logprobs = list(delta.logprobs) if delta.logprobs else None
        if (parser := gen.request.parser) is not None:
            message = parser.feed(text, list(delta.token_ids), finished=finish is not None)
            parsed = parser.finish(finish) if finish is not None else None
            reasoning = parser.reasoning_tokens()
            logprobs = None if parser.hides_logprobs else logprobs
            if usage is not None:
                usage.reasoning_tokens = reasoning
        return GenerateChunk(request_id=gen.request_id, token_ids=list(delta.token_ids),
                             text=text, finish_reason=finish, usage=usage,
                             num_prompt_tokens=gen.num_prompt_tokens,
                             num_output_tokens=gen.num_output, num_reasoning_tokens=reasoning,
                             logprobs=logprobs,
                             prompt_logprobs=_listed(delta.prompt_logprobs),
                             message=message, parsed=parsed)  # fmt: skip

    # -- migrated-in requests ------------------------------------------------
    async def adopt(self, spec: ResumeSpec) -> asyncio.Future[bool]:
        """Run a migrated-in request and return once the engine has admitted
        it (the hand-off: raises if it could not). From then on its chunks are
        held for the client's gateway, which resumes it (``resume``); if none
        does within ``resume_timeout_s`` it is aborted. The returned future
        resolves at its first token here, or when it ends without one."""
        gen, frozen_for_s = Generation.resumed(spec), spec.frozen_for_s
        if spec.text is not None:
            gen.text = TextStream.resumed(self.engine.tokenizer, spec.text,
                                          **special_tokens(spec.sampling))  # fmt: skip
        loop = asyncio.get_running_loop()
        first: asyncio.Future[bool] = loop.create_future()
        queue: asyncio.Queue[GenerateChunk | None] = asyncio.Queue()
        t0 = self._clock()
        mode = "kv" if gen.kv_load is not None else "recompute"

        async def pump() -> None:
            try:
                async with contextlib.aclosing(self.run(gen.request, gen)) as chunks:
                    async for chunk in chunks:
                        if chunk.token_ids and not first.done():
                            first.set_result(True)
                            downtime = frozen_for_s + self._clock() - t0
                            self.metrics.migration.downtime.labels(mode).observe(downtime)
                        queue.put_nowait(chunk)
            except Exception as exc:
                log.exception("migrated-in request %s failed", gen.request_id)
                queue.put_nowait(GenerateChunk(
                    request_id=gen.request_id, finish_reason="error",
                    error=ErrorDetail(message=f"engine error: {exc}", type="engine_error"),
                ))  # fmt: skip
            finally:
                if not first.done():
                    first.set_result(False)
                queue.put_nowait(None)

        task = asyncio.create_task(pump(), name=f"adopted-{gen.request_id}")
        admitted = asyncio.ensure_future(gen.admitted.wait())
        await asyncio.wait({admitted, task}, return_when=asyncio.FIRST_COMPLETED)
        if not gen.admitted.is_set():
            admitted.cancel()
            raise ServiceUnavailableError(
                f"the engine did not take migrated request {gen.request_id!r}"
            )
        self._parked[gen.request_id] = (queue, task, gen.resume_token)
        loop.call_later(self.config.resume_timeout_s, self._unclaimed, gen.request_id, task)
        return first

    def _unclaimed(self, request_id: str, task: asyncio.Task[None]) -> None:
        parked = self._parked.get(request_id)
        if parked is not None and parked[1] is task:
            log.warning("nobody resumed migrated request %s within %.0f s of its hand-off: "
                        "aborting it", request_id, self.config.resume_timeout_s)  # fmt: skip
            self.metrics.migration.unclaimed.inc()
            del self._parked[request_id]
            task.cancel()

    @property
    def parked(self) -> list[str]:
        """Migrated-in requests whose client has not resumed them yet."""
        return sorted(self._parked)

    def resume(self, request_id: str, token: str | None) -> AsyncGenerator[GenerateChunk, None]:
        """The chunks of a migrated-in request, for the one client that
        follows it here: the one with its resume token (a wrong or missing
        token is told, as an unknown id is, that nothing waits; the request
        stays parked for its owner). Closing the stream aborts the request."""
        parked = self._parked.get(request_id)
        if parked is None or not _same_token(parked[2], token):
            self.metrics.migration.resume_refused.labels(
                "unknown" if parked is None else "token").inc()  # fmt: skip
            raise NotFoundError(f"no migrated request {request_id!r} waits here for this "
                                "resume token", param="request_id")  # fmt: skip
        queue, task, _ = self._parked.pop(request_id)

        async def chunks() -> AsyncGenerator[GenerateChunk, None]:
            try:
                while (chunk := await queue.get()) is not None:
                    yield chunk
            finally:
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

        return chunks()

    async def abort(self, request_id: str) -> bool:
        gen = self._generations.get(request_id)
        return gen is not None and await self.engine.abort(gen.engine_request_id)

    def generation(self, request_id: str) -> Generation | None:
        return self._generations.get(request_id)

    @property
    def generations(self) -> list[Generation]:
        return list(self._generations.values())

    @property
    def num_inflight(self) -> int:
        return len(self._generations)


@dataclass
class _Latency:
    """One request's time to first token and time per token, into the
    instance's histograms."""

    metrics: InstanceMetrics
    priority: str
    arrival_time: float
    last: float | None = None
    """When its previous tokens came (None: none yet)."""

    def tokens_at(self, now: float) -> None:
        if self.last is None:
            self.metrics.ttft.labels(self.priority).observe(now - self.arrival_time)
        else:
            self.metrics.tpot.labels(self.priority).observe(now - self.last)
        self.last = now


def _listed(entries: tuple[PromptLogprob, ...] | None) -> list[PromptLogprob] | None:
    return list(entries) if entries is not None else None


def _same_token(expected: str | None, given: str | None) -> bool:
    """Whether ``given`` is the request's resume token (never, if it has none)."""
    return (
        expected is not None
        and given is not None
        and hmac.compare_digest(expected.encode(), given.encode())
    )
