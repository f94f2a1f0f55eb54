"""The ``vllm`` engine: upstream vLLM's ``AsyncLLM`` behind Shoal's Engine.

Prefix caching and chunked prefill stay on; the scheduler runs with
``scheduling_policy="priority"`` so Shoal's priority classes map onto vLLM's
per-request priority (lower runs first). Load figures come from the engine's
own scheduler statistics (blocks in use, running and waiting counts, preemptions)
through a stat logger, plus the worker's per-request token counts.

vLLM is imported lazily: importing this module is cheap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.contract import PromptLogprob, SamplingSpec, TokenLogprob, TopLogprob
from infra.errors import BadRequestError
from infra.tls import PLAIN, ClusterTls
from instance.connector_port import ConnectorPort
from instance.engine import (
    ChatMessage,
    EngineLimits,
    EngineLoad,
    EngineRequest,
    RequestLoad,
    TokenDelta,
    blocks_for,
)
from instance.engine_args import EngineArgsChoice
from instance.output_parsing import OutputParsing
from migration.ports import KvPort
from migration.wire import TRANSFER_KEY, Endpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VllmOptions:
    """How Shoal runs vLLM (from the instance's settings, ``instance.main``)."""

    args: EngineArgsChoice
    """The engine arguments chosen for the platform (``instance.engine_args``)."""
    kv_endpoint: str | None = None
    """``host:port`` for Shoal's KV connector (live migration); None = off.
    With tensor parallelism, rank ``r`` listens on ``port + r``."""
    kv_auth: str | None = None
    """The cluster's KV credential, sent to the connector (None: an open
    cluster). The connector, in vLLM's processes, reads the cluster secret
    from the same settings."""
    kv_tls: ClusterTls = PLAIN
    """How the connector serves, TLS or plain TCP (it reads the same settings)."""
    kv_transport: str = "tcp"
    """How KV blocks move between instances (``migration.transport``)."""
    kv_pace_bytes_per_s: float = 0.0
    """Bound on the rate a source serves KV blocks at (0 = unbounded)."""
    tool_call_parser: str | None = None
    """vLLM's tool-call parser to run (``--tool-call-parser`` with
    ``--enable-auto-tool-choice``); None: none, tool choices that need one are refused."""
    reasoning_parser: str | None = None
    """vLLM's reasoning parser (``--reasoning-parser``): splits every chat
    output into reasoning and content, and holds a structured output's
    constraint back until the reasoning ends (None: none)."""


class HfTokenizer:
    """The model's Hugging Face tokenizer with its chat template."""

    def __init__(self, model: str) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(model)
        self.vocab_size = len(self._tok)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def apply_chat_template(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[Mapping[str, Any]] | None = None,
        kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        rendered = self._tok.apply_chat_template(
            [m.as_dict() for m in messages],
            tools=list(tools) if tools else None,
            tokenize=False,
            add_generation_prompt=True,
            **(kwargs or {}),
        )
        return self.encode(str(rendered))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True,
               spaces_between_special_tokens: bool = True) -> str:  # fmt: skip
        # (A fast tokenizer ignores spaces_between_special_tokens, as in vLLM.)
        return str(
            self._tok.decode(
                list(token_ids),
                skip_special_tokens=skip_special_tokens,
                spaces_between_special_tokens=spaces_between_special_tokens,
            )
        )


@dataclass
class _Tracked:
    """A request the worker has handed to vLLM."""

    request: EngineRequest
    num_output: int = 0


class _SchedulerView:
    """Latest scheduler statistics, written by vLLM's stat-logger hook."""

    def __init__(self) -> None:
        self.num_running = 0
        self.num_waiting = 0
        self.kv_usage = 0.0
        self.num_preempted_total = 0
        self.num_generation_tokens_total = 0
        self.num_finished_total = 0

    def logger_factory(self) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        view = self

        class _ShoalStatLogger(StatLoggerBase):  # type: ignore[misc]
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(
                self,
                scheduler_stats: Any,
                iteration_stats: Any,
                mm_cache_stats: Any = None,
                engine_idx: int = 0,
            ) -> None:
                if scheduler_stats is not None:
                    view.num_running = scheduler_stats.num_running_reqs
                    view.num_waiting = scheduler_stats.num_waiting_reqs
                    view.kv_usage = scheduler_stats.kv_cache_usage
                if iteration_stats is not None:
                    view.num_preempted_total += iteration_stats.num_preempted_reqs
                    view.num_generation_tokens_total += iteration_stats.num_generation_tokens
                    view.num_finished_total += len(iteration_stats.finished_requests)

            def log_engine_initialized(self) -> None:
                pass

        return _ShoalStatLogger


class VllmEngine:
    """``Engine`` implementation over vLLM's ``AsyncLLM``."""

    kind = "vllm"

    def __init__(self, options: VllmOptions) -> None:
        self.options = options
        chosen = options.args
        self.tokenizer = HfTokenizer(chosen.model)
        # What vLLM leaves to itself (None) is known once it has started.
        self.limits = EngineLimits(
            block_size=chosen.block_size or 0,
            num_blocks_total=0,
            max_num_seqs=chosen.max_num_seqs or 0,
            max_model_len=chosen.max_model_len or 0,
            platform=chosen.platform.kind,
            devices=chosen.platform.devices,
            engine_args=chosen.values(),
        )
        self._llm: Any = None
        self.output_parsing: OutputParsing | None = None
        self._view = _SchedulerView()
        self._tracked: dict[str, _Tracked] = {}
        self.kv_port: KvPort | None = (
            ConnectorPort(
                Endpoint.parse(options.kv_endpoint),
                ranks=chosen.tensor_parallel_size,
                auth=options.kv_auth,
                tls=options.kv_tls,
            )
            if options.kv_endpoint
            else None
        )

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            **self.options.args.kwargs(),
            enable_prefix_caching=True,
            enable_chunked_prefill=True,
            scheduling_policy="priority",
            disable_log_stats=False,
            kv_transfer_config=self._kv_transfer_config(),
            reasoning_parser=self.options.reasoning_parser or "",
        )
        self._llm = AsyncLLM.from_engine_args(args, stat_loggers=[self._view.logger_factory()])
        config = self._llm.vllm_config
        self.limits.num_blocks_total = int(config.cache_config.num_gpu_blocks or 0)
        self.limits.block_size = int(config.cache_config.block_size)
        self.limits.max_model_len = int(config.model_config.max_model_len)
        self.limits.max_num_seqs = int(config.scheduler_config.max_num_seqs)
        if self.options.tool_call_parser or self.options.reasoning_parser:
            from instance.vllm_parsing import VllmOutputParsing

            self.output_parsing = VllmOutputParsing(
                self._llm.renderer.tokenizer, config.model_config,
                tool_parser=self.options.tool_call_parser,
                reasoning_parser=self.options.reasoning_parser,
            )  # fmt: skip
        log.info("vLLM engine ready: %s", ready_summary(self.limits))

    def _kv_transfer_config(self) -> Any:
        if self.options.kv_endpoint is None:
            return None
        from vllm.config import KVTransferConfig

        endpoint = Endpoint.parse(self.options.kv_endpoint)
        return KVTransferConfig(
            kv_connector="ShoalKVConnector",
            kv_connector_module_path="migration.kv_connector",
            kv_role="kv_both",
            kv_connector_extra_config={
                "host": endpoint.host,
                "port": endpoint.port,
                "transport": self.options.kv_transport,
                "pace_bytes_per_s": self.options.kv_pace_bytes_per_s,
            },
            kv_load_failure_policy="recompute",
        )

    def check(self, sampling: SamplingSpec) -> None:
        """vLLM's own checks of the sampling (``SamplingParams.verify``): a
        structured-output constraint its backend cannot compile is a 400."""
        if self._llm is None or sampling.structured is None:
            return
        from vllm.exceptions import VLLMClientError

        config = self._llm.vllm_config
        try:
            sampling_params(sampling).verify(
                config.model_config, config.speculative_config,
                config.structured_outputs_config, self._llm.renderer.tokenizer,
            )  # fmt: skip
        except (VLLMClientError, ValueError) as exc:  # vLLM's validation errors
            raise BadRequestError(str(exc), param="structured_outputs") from None

    async def stop(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    @property
    def healthy(self) -> bool:
        return self._llm is not None and not self._llm.errored

    async def abort(self, request_id: str) -> bool:
        if request_id not in self._tracked or self._llm is None:
            return False
        await self._llm.abort(request_id)
        return True

    async def generate(
        self, request: EngineRequest, admitted: Callable[[], None] = lambda: None
    ) -> AsyncGenerator[TokenDelta, None]:
        from vllm.inputs import TokensPrompt

        s = request.sampling
        params = sampling_params(s)
        if request.kv_transfer is not None:
            load = request.kv_transfer
            params.extra_args = {"kv_transfer_params": {TRANSFER_KEY: {
                "key": load.key, "num_tokens": load.num_tokens}}}  # fmt: skip
        prompt = TokensPrompt(prompt_token_ids=list(request.prompt_token_ids))
        tracked = _Tracked(request)
        self._tracked[request.request_id] = tracked
        finished = False
        try:
            # ``add_request`` then the request's output queue, as vLLM's own
            # ``generate`` does, so the caller learns when the engine has it.
            parser = request.parser
            outputs = await self._llm.add_request(
                request.request_id, prompt, params, priority=request.priority.rank,
                reasoning_ended=parser.reasoning_ended if parser else None,
                reasoning_parser_kwargs=parser.engine_kwargs if parser else None,
            )  # fmt: skip
            admitted()
            while not finished:
                output = outputs.get_nowait() or await outputs.get()
                completion = output.outputs[0]
                tracked.num_output += len(completion.token_ids)
                finished = output.finished
                yield TokenDelta(
                    token_ids=tuple(completion.token_ids),
                    logprobs=_logprobs(completion, s.logprobs),
                    prompt_logprobs=self._prompt_logprobs(output, s.prompt_logprobs),
                    text=completion.text,
                    num_prompt_tokens=len(request.prompt_token_ids),
                    num_output_tokens=tracked.num_output,
                    finish_reason=completion.finish_reason if finished else None,
                )
        finally:
            self._tracked.pop(request.request_id, None)
            if not finished and self._llm is not None:
                await asyncio.shield(self._llm.abort(request.request_id))

    def _prompt_logprobs(self, output: Any, top: int | None) -> tuple[PromptLogprob, ...] | None:
        """vLLM's prompt logprobs (on a request's first output); the first
        prompt token, which nothing predicts, has none."""
        if top is None or not output.prompt_logprobs:  # later outputs have []
            return None
        out = []
        for token_id, position in zip(output.prompt_token_ids, output.prompt_logprobs,
                                      strict=True):  # fmt: skip
            if position is None:
                token = self.tokenizer.decode([token_id], skip_special_tokens=False)
                out.append(PromptLogprob(token_id=token_id, token=token, logprob=None))
            else:
                out.append(PromptLogprob(**_at(token_id, position, top).model_dump()))
        return tuple(out)

    def load(self) -> EngineLoad:
        """Real scheduler figures (KV usage, running count, preemptions), with
        per-request footprints from the worker's bookkeeping: requests that have
        produced tokens, plus as many as the scheduler reports running (by
        priority then arrival), are running; the rest wait in that order."""
        total = self.limits.num_blocks_total
        bs = self.limits.block_size
        if not self._tracked:
            return EngineLoad(
                num_blocks_total=total,
                num_blocks_used=0,
                num_preempted_total=self._view.num_preempted_total,
                num_finished_total=self._view.num_finished_total,
                num_generation_tokens_total=self._view.num_generation_tokens_total,
            )
        ordered = sorted(
            self._tracked.values(),
            key=lambda t: (t.num_output == 0, t.request.priority.rank, t.request.arrival_time),
        )
        # A request that has produced tokens is running; the scheduler's own count
        # (which can lag by a step) adds the ones still prefilling.
        num_decoding = sum(1 for t in ordered if t.num_output > 0)
        num_running = min(max(self._view.num_running, num_decoding), len(ordered))
        running = [_request_load(t, bs) for t in ordered[:num_running]]
        waiting = [_request_load(t, bs) for t in ordered[num_running:]]
        return EngineLoad(
            num_blocks_total=total,
            num_blocks_used=round(self._view.kv_usage * total),
            running=running,
            waiting=waiting,
            num_preempted_total=self._view.num_preempted_total,
            num_finished_total=self._view.num_finished_total,
            num_generation_tokens_total=self._view.num_generation_tokens_total,
        )


def ready_summary(limits: EngineLimits) -> str:
    """The engine's shape once started, for the start-up log: platform,
    devices, KV capacity (blocks and tokens) and limits."""
    devices = f" ({', '.join(limits.devices)})" if limits.devices else ""
    return (
        f"{limits.platform}{devices}; KV cache {limits.num_blocks_total} blocks of "
        f"{limits.block_size} tokens = {limits.capacity_tokens} tokens; "
        f"max_model_len {limits.max_model_len}, max_num_seqs {limits.max_num_seqs}"
    )


def _request_load(t: _Tracked, block_size: int) -> RequestLoad:
    num_tokens = len(t.request.prompt_token_ids) + t.num_output
    return RequestLoad(
        request_id=t.request.request_id,
        priority=t.request.priority,
        arrival_time=t.request.arrival_time,
        num_tokens=num_tokens,
        num_blocks=blocks_for(num_tokens, block_size),
    )


def resolve_model(model: str | None, cache_dir: Path) -> str:
    """A model id or path; the generated tiny model when none is given."""
    if model:
        return model
    from instance.tiny_model import default_tiny_model

    return str(default_tiny_model(cache_dir))


def sampling_params(s: SamplingSpec) -> Any:
    """vLLM's ``SamplingParams`` for Shoal's sampling (deltas out)."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

    structured = None
    if (c := s.structured) is not None:
        structured = StructuredOutputsParams(
            json=c.json_schema, json_object=c.json_object, regex=c.regex,
            choice=list(c.choice) if c.choice is not None else None, grammar=c.grammar,
            disable_any_whitespace=c.disable_any_whitespace,
            disable_additional_properties=c.disable_additional_properties,
            whitespace_pattern=c.whitespace_pattern,
        )  # fmt: skip
    return SamplingParams(
        max_tokens=s.max_tokens,
        min_tokens=s.min_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k if s.top_k > 0 else 0,
        seed=s.seed,
        stop=list(s.stop) or None,
        ignore_eos=s.ignore_eos,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty,
        min_p=s.min_p,
        include_stop_str_in_output=s.include_stop_str_in_output,
        stop_token_ids=list(s.stop_token_ids) or None,
        logit_bias=dict(s.logit_bias) or None,
        output_kind=RequestOutputKind.DELTA,
        logprobs=s.logprobs,
        structured_outputs=structured,
        skip_special_tokens=s.skip_special_tokens,
        spaces_between_special_tokens=s.spaces_between_special_tokens,
        prompt_logprobs=s.prompt_logprobs,
        # The worker makes the text from the token ids (instance.text), so
        # vLLM detokenizes only to find stop strings and name logprob tokens.
        detokenize=bool(s.stop) or s.logprobs is not None or s.prompt_logprobs is not None,
    )


def _logprobs(completion: Any, top: int | None) -> tuple[TokenLogprob, ...] | None:
    """vLLM's logprobs of a delta's tokens: per position, the sampled token's
    and the ``top`` most likely ones (by rank)."""
    if top is None or completion.logprobs is None:
        return None
    return tuple(_at(token_id, position, top)
                 for token_id, position in zip(completion.token_ids, completion.logprobs,
                                               strict=True))  # fmt: skip


def _at(token_id: int, position: Any, top: int) -> TokenLogprob:
    """One position of vLLM's logprobs: ``token_id``'s and the ``top`` best."""
    chosen = position[token_id]
    ranked = sorted((lp.rank, tid, lp) for tid, lp in position.items()
                    if lp.rank is not None and lp.rank <= top)  # fmt: skip
    return TokenLogprob(
        token_id=token_id, token=chosen.decoded_token or "", logprob=chosen.logprob,
        rank=chosen.rank,
        top=[TopLogprob(token_id=tid, token=lp.decoded_token or "", logprob=lp.logprob,
                        rank=lp.rank) for _, tid, lp in ranked[:top]],
    )  # fmt: skip
