"""Typed settings. Every field is documented and overridable from the
environment with the ``SHOAL_`` prefix (e.g. ``SHOAL_REDIS_URL``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra.cluster_auth import SECRET_VARIABLES, ClusterKeys, ClusterSecretMissing, new_secret
from infra.tls import ClusterTls

EngineKind = Literal["vllm", "sim"]


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "shoal"


class CommonSettings(BaseSettings):
    """Settings every Shoal process reads."""

    model_config = SettingsConfigDict(
        env_prefix="SHOAL_", extra="ignore", use_attribute_docstrings=True
    )

    redis_url: str | None = None
    """URL of an existing Redis/Valkey (``redis://host:port/0``). When unset, Shoal
    uses the embedded server of this checkout (started on demand, see
    ``run_dir``)."""

    namespace: str = "shoal"
    """Prefix of every Redis key Shoal writes (see docs/STATE.md)."""

    run_dir: Path = Path(".shoal")
    """Directory for run-time files of this checkout: the embedded server's data
    and the file naming its URL, so other ``shoal`` commands find it."""

    cache_dir: Path = Field(default_factory=_default_cache_dir)
    """Directory for generated artefacts, such as the tiny model."""

    heartbeat_ttl_s: float = 3.0
    """Lifetime of an instance's registry and load records; an instance that stops
    reporting disappears from the registry after this long."""

    otlp_endpoint: str | None = None
    """OTLP/HTTP endpoint for traces (``http://collector:4318``); tracing is a
    no-op when unset."""

    log_level: str = "INFO"
    """Python logging level for Shoal's own loggers."""

    cluster_secret_file: Path | None = None
    """File of the cluster secret that authenticates every internal call
    (first line; a second line is the previous secret, still accepted during
    a rotation). ``shoal up`` generates one in ``run_dir``."""

    cluster_secret: SecretStr | None = None
    """The cluster secret itself (from a secret store); wins over the file."""

    cluster_secret_previous: SecretStr | None = None
    """The previous cluster secret, accepted (never sent) during a rotation."""

    insecure_open_cluster: bool = False
    """Run without a cluster secret: every internal surface (instances'
    ``/generate``, ``/migrate``, ``/resume``, the KV port) serves anyone who
    reaches it. Off, a process with no secret refuses to start."""

    tls_cert_file: Path | None = None
    """PEM certificate chain of this member: set (with ``tls_key_file``), its
    instance HTTP server and KV port speak TLS only and it registers an
    ``https://`` address (docs/SECURITY.md). It is also presented as the client
    certificate for mutual TLS."""

    tls_key_file: Path | None = None
    """PEM private key of ``tls_cert_file``."""

    tls_ca_file: Path | None = None
    """PEM bundle of the CA that signs the members' certificates: clients
    (gateways, the autoscaler, instances) verify instances against it; unset,
    the system's trust store."""

    tls_check_hostname: bool = True
    """Whether an instance's certificate must name the host it is reached at.
    Off (with the cluster's own ``tls_ca_file``), any certificate that CA signed
    is a member's: one certificate serves a fleet whose addresses change."""

    tls_mutual: bool = False
    """Servers also require a client certificate signed by ``tls_ca_file``."""

    def cluster_tls(self) -> ClusterTls:
        """This process's TLS; raises :class:`TlsConfigError` for settings that
        contradict each other or name missing files."""
        return ClusterTls(cert_file=self.tls_cert_file, key_file=self.tls_key_file,
                          ca_file=self.tls_ca_file, check_hostname=self.tls_check_hostname,
                          mutual=self.tls_mutual)  # fmt: skip

    def cluster_keys(self) -> ClusterKeys:
        """The cluster secrets; raises :class:`ClusterSecretMissing` when none
        is configured and the cluster is not declared open."""
        if self.cluster_secret is not None:
            previous = self.cluster_secret_previous
            return ClusterKeys.of(self.cluster_secret.get_secret_value(),
                                  previous.get_secret_value() if previous else None)  # fmt: skip
        if self.cluster_secret_file is not None:
            return ClusterKeys.from_file(self.cluster_secret_file)
        if self.insecure_open_cluster:
            return ClusterKeys.open()
        raise ClusterSecretMissing(
            "no cluster secret: set SHOAL_CLUSTER_SECRET_FILE (or SHOAL_CLUSTER_SECRET), "
            "or SHOAL_INSECURE_OPEN_CLUSTER=true to let anyone who reaches the instances in"
        )


class InstanceSettings(CommonSettings):
    """Settings of an instance worker (``shoal instance``)."""

    engine: EngineKind = "vllm"
    """Engine behind the worker: ``vllm`` (real vLLM) or ``sim`` (simulated)."""

    model: str | None = None
    """Hugging Face model id or local path; unset means the generated tiny model."""

    served_model_name: str | None = None
    """Name clients use for the model; defaults to ``model`` (or ``tiny-llama``)."""

    host: str = "127.0.0.1"
    """Interface the worker listens on."""

    port: int = Field(default=8100, ge=0, le=65535)
    """TCP port the worker listens on (0 picks a free one)."""

    advertise_host: str | None = None
    """Host other components use to reach this worker; defaults to ``host``."""

    instance_id: str | None = None
    """Stable id of this instance; a random one is made when unset."""

    report_interval_s: float = Field(default=0.05, gt=0.0)
    """Period of LoadReports published to Redis (Llumnix-style 50-100 ms)."""

    block_size: int | None = Field(default=None, ge=1)
    """Tokens per KV-cache block; unset means the engine's default (vLLM picks one
    its kernels accept, a multiple of 32 on CPU; the sim engine uses 16)."""

    max_num_seqs: int | None = Field(default=None, ge=1)
    """Largest batch (running requests) the engine schedules; unset: 16 on CPU
    and in the sim engine, vLLM's default on GPUs (see docs/ENGINE.md)."""

    max_model_len: int | None = Field(default=None, ge=16)
    """Longest sequence (prompt + output) a request may reach; unset: 2048 on
    CPU and in the sim engine, the model's own context length on GPUs."""

    kv_cache_bytes: int | None = Field(default=None, ge=1024 * 1024)
    """KV-cache memory per device, in bytes (vLLM's ``kv_cache_memory_bytes``);
    set, it wins on every platform. Unset: 64 MiB on CPU; on GPUs vLLM sizes the
    cache from ``gpu_memory_utilization`` (what the weights and activations
    leave of that share of each device's memory)."""

    gpu_memory_utilization: float = Field(default=0.92, gt=0.0, le=1.0)
    """Share of each GPU's memory vLLM may use (weights, activations and the KV
    cache, which gets the rest) when ``kv_cache_bytes`` is unset; the default is
    vLLM's. Not used on CPU."""

    tensor_parallel_size: int = Field(default=1, ge=1)
    """GPUs one instance spans (vLLM's tensor parallelism): every layer is
    split over this many ranks, one per device. Its KV connector runs on each
    rank, rank ``r`` on ``kv_port + r``."""

    num_sim_blocks: int = Field(default=1024, ge=1)
    """KV-cache capacity of the sim engine, in blocks."""

    sim_speedup: float = Field(default=1.0, gt=0.0)
    """Sim engine: divides every modelled step latency (for fast tests)."""

    sim_startup_s: float = Field(default=0.0, ge=0.0)
    """Sim engine: modelled start-up time (loading weights) before it serves,
    for cold-start experiments (vLLM loads LLaMA-7B in ~30-60 s on a GPU)."""

    resume_timeout_s: float = Field(default=60.0, gt=0.0)
    """A migrated-in request is held for its client from the hand-off on; if no
    client has resumed it this long after, it is aborted (logged with its id and
    counted in ``shoal_instance_migrations_unclaimed_total``). The client's
    gateway follows at once, so this only ends requests whose client is gone."""

    high_priority_headroom_blocks: int = Field(default=32, ge=0)
    """Blocks of virtual usage a high-priority request adds to its instance, so the
    instance's batch stays small and its decoding fast (Llumnix headroom)."""

    dtype: str = "auto"
    """Model dtype passed to vLLM (``float32`` is used for the tiny model on CPU)."""

    cpu_threads_bind: str | None = None
    """Cores for the vLLM CPU engine's OpenMP threads (``VLLM_CPU_OMP_THREADS_BIND``),
    e.g. ``0`` or ``0-1``; pin each engine on a shared host to its own cores."""

    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Largest request body accepted; larger ones get a 413."""

    enforce_eager: bool | None = None
    """Disable graph capture in vLLM (faster start-up, slower decoding); unset:
    on for CPU (the CPU build needs it), off on GPUs (CUDA graphs captured)."""

    kv_transfer: bool = True
    """Live migration by KV transfer (vLLM engine): loads Shoal's KV connector,
    which serves this instance's KV blocks to peers over TCP. Off = migrations
    from and to this instance recompute."""

    kv_port: int = Field(default=0, ge=0, le=65535)
    """TCP port of the KV connector (0 = a free port); reachable by the other
    instances at ``advertise_host``."""

    kv_transport: Literal["tcp", "shm"] = "tcp"
    """How KV blocks move between instances' connectors: ``tcp`` (one framed
    message per stage, any two hosts) or ``shm`` (same host only: the source
    gathers into a shared-memory segment the destination maps, so no socket
    copies). See docs/MIGRATION.md for NIXL."""

    kv_pace_mib_s: float = Field(default=0.0, ge=0.0)
    """Bound on the rate a source serves KV blocks at, in MiB/s (0 = as fast
    as the link). The copy competes with the source's own decoding for memory
    bandwidth (and on CPU for cores): a bound trades migration time for a
    smaller decode slowdown (measured in docs/BENCHMARKS.md)."""

    allow_direct_requests: bool = False
    """For debugging: let callers without the cluster credential use this
    instance's ``/generate``, ``/v1/*``, ``/tokenize`` and ``/detokenize``
    (never its control or migration surfaces). Their requests get at most
    ``normal`` priority, are never migrated, and are counted in
    ``shoal_instance_direct_requests_total``."""

    tool_call_parser: str | None = None
    """vLLM's tool-call parser for the model (``hermes``, ``pythonic``,
    ``llama3_json``, ...: vLLM's ``--tool-call-parser``), run for chat requests
    with tools when ``enable_auto_tool_choice`` is on; unset: tool choices
    other than ``none`` are refused, as ``vllm serve`` refuses them."""

    enable_auto_tool_choice: bool = False
    """Run ``tool_call_parser`` (vLLM's ``--enable-auto-tool-choice``)."""

    reasoning_parser: str | None = None
    """vLLM's reasoning parser for the model (``deepseek_r1``, ``qwen3``, ...:
    vLLM's ``--reasoning-parser``): every chat output is split into
    ``reasoning`` and ``content``, a structured output is constrained only
    after the reasoning, and such requests are pinned to their instance
    (docs/MIGRATION.md). vLLM engine only."""

    sim_kv_bandwidth_gbps: float = Field(default=10.0, gt=0.0)
    """Sim engine: modelled bandwidth of a KV transfer between instances, in
    Gbit/s. The sim engine migrates by KV transfer too when ``kv_transfer`` is
    on (its port listens on ``kv_port``), serving simulated blocks whose
    transfer time is ``sim_kv_latency_ms + bytes / bandwidth``, divided by
    ``sim_speedup`` like every modelled time. The default assumes 10 Gbit/s TCP
    between hosts (a common datacenter NIC; Shoal's connector moves blocks over
    plain TCP)."""

    sim_kv_latency_ms: float = Field(default=1.0, ge=0.0)
    """Sim engine: fixed cost of one KV transfer stage, in ms (connection
    set-up and a few datacenter round trips of 0.1-0.5 ms)."""

    sim_kv_bytes_per_token: int = Field(default=2 * 32 * 4096 * 2, ge=1)
    """Sim engine: KV bytes per token, times ``block_size`` per block. The
    default is LLaMA-7B in fp16 (K and V x 32 layers x 4096 hidden x 2 bytes =
    512 KiB), the model the sim's step latencies follow."""

    @model_validator(mode="after")
    def _check(self) -> InstanceSettings:
        if (
            self.block_size is not None
            and self.max_model_len is not None
            and self.max_model_len < self.block_size
        ):
            raise ValueError(
                f"max_model_len ({self.max_model_len}) must be >= block_size ({self.block_size})"
            )
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("enable_auto_tool_choice needs a tool_call_parser")  # as vLLM's
        return self

    @property
    def public_host(self) -> str:
        return self.advertise_host or self.host


class GatewaySettings(CommonSettings):
    """Settings of a gateway replica (``shoal gateway``)."""

    host: str = "127.0.0.1"
    """Interface the gateway listens on."""

    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port of the OpenAI-compatible API."""

    dispatch_policy: str | None = None
    """Name of the registered dispatch policy (``llumnix``, ``least-load``,
    ``round-robin``, ``random``); unset: the registry's default (``llumnix``)."""

    view_refresh_interval_s: float = Field(default=0.05, gt=0.0)
    """How often the gateway re-reads instance load from Redis."""

    view_max_staleness_s: float = Field(default=30.0, gt=0.0)
    """While Redis is unreachable, keep dispatching from the last view for this long."""

    max_attempts: int = Field(default=3, ge=1)
    """Instances tried for one request before its first token (failures excluded)."""

    retry_backoff_s: float = Field(default=0.05, ge=0.0)
    """Base backoff between attempts (doubles each attempt)."""

    max_replays: int = Field(default=3, ge=0)
    """Times a stream whose instance fails after its first token is continued on
    another instance from the tokens already sent (token replay); after that the
    client gets an OpenAI-format error event."""

    reservation_ttl_s: float = Field(default=10.0, gt=0.0)
    """Lifetime of an in-flight reservation that is never released."""

    reservation_timeout_s: float = Field(default=0.1, gt=0.0)
    """Longest wait for Redis to record a reservation; past it the request is
    dispatched from the current view (Redis starved or down must not add
    latency)."""

    connect_timeout_s: float = Field(default=2.0, gt=0.0)
    """Connect timeout to an instance worker."""

    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Largest request body accepted; larger ones get a 413."""

    default_max_priority: str = "normal"
    """Highest priority a request may ask for when no API keys are configured."""

    keys_file: Path | None = None
    """JSON file of API keys (see docs/KEYS.md). Keys are also read from Redis
    (``shoal keys add``). With no key anywhere, authentication is off."""

    max_held_requests: int = Field(default=256, ge=0)
    """Requests this replica holds while no instance of their model is ready
    (scale from zero); beyond this, 503 with ``Retry-After``. 0 disables holding."""

    hold_timeout_s: float = Field(default=120.0, gt=0.0)
    """How long a held request waits for an instance before a 503."""


class AutoscalerSettings(CommonSettings):
    """Settings of the autoscaler (``shoal autoscaler``). Its scaling and
    pairing fields are those of :class:`autoscaler.policies.ScalingConfig` and
    :class:`autoscaler.policies.PairingConfig` (documented there)."""

    host: str = "127.0.0.1"
    """Interface of the autoscaler's ``/metrics`` and ``/healthz`` endpoints."""

    port: int = Field(default=8200, ge=0, le=65535)
    """Port of ``/metrics`` and ``/healthz``."""

    autoscaler_id: str | None = None
    """Name of this autoscaler in the lease and events (default: random)."""

    provider: Literal["local", "ray"] = "local"
    """Where instances run: processes on this machine, or actors on Ray."""

    ray_address: str | None = None
    """Ray cluster to join (``auto``, ``ray://head:10001``); unset starts a local one."""

    ray_num_gpus: float | None = Field(default=None, ge=0.0)
    """GPUs each instance actor asks Ray for; unset: ``tensor_parallel_size``
    (one per rank) for the vllm engine, none for the sim engine. 0 runs vLLM
    instances on CPU nodes; a fraction below 1 packs several one-GPU instances
    on a GPU. Anything else must equal ``tensor_parallel_size``."""

    ray_num_cpus: float = Field(default=1.0, ge=0.0)
    """CPUs each instance actor asks Ray for."""

    tensor_parallel_size: int = Field(default=1, ge=1)
    """GPUs each instance spans (vLLM tensor parallelism), passed to every
    instance it starts (``--tensor-parallel-size``)."""

    engine: EngineKind = "vllm"
    """Engine of the instances it starts."""

    model: str | None = None
    """Model the instances serve (``--model``); unset: the generated tiny model
    (vLLM) or the sim model."""

    served_model_name: str | None = None
    """Name clients use for the model (default: ``model``)."""

    instance_args: str = ""
    """Extra ``shoal instance`` arguments for every instance, shell-quoted
    (e.g. ``--max-num-seqs 8 --kv-cache-bytes 268435456``)."""

    min_instances: int = Field(default=1, ge=0)
    """Never fewer active or starting instances; 0 allows scale to zero."""
    max_instances: int = Field(default=4, ge=1)
    """Never more instances."""
    freeness_low: float = 10.0
    """Scale out while the average freeness (free KV blocks per running
    request, Llumnix) stays below this."""
    freeness_high: float = 60.0
    """Scale in (drain one instance) while it stays above this."""
    scale_out_ticks: int = Field(default=3, ge=1)
    """Consecutive ticks below the band before scaling out."""
    scale_in_ticks: int = Field(default=10, ge=1)
    """Consecutive ticks above the band before scaling in."""
    cooldown_s: float = Field(default=10.0, ge=0.0)
    """No scaling change for this long after the previous one."""
    idle_timeout_s: float = Field(default=60.0, ge=0.0)
    """With ``min_instances = 0``: stop every instance after this long idle."""
    scaling_policy: str | None = None
    """Registered scaling policy (``band``, ``static``, ``slo``); unset: the
    registry's default (``band``)."""
    slo_ttft_high_s: float = Field(default=1.0, gt=0.0)
    """``slo`` policy: TTFT P99 target of high-priority requests."""
    slo_ttft_normal_s: float = Field(default=5.0, gt=0.0)
    """``slo`` policy: TTFT P99 target of normal-priority requests."""
    slo_ttft_low_s: float = Field(default=30.0, gt=0.0)
    """``slo`` policy: TTFT P99 target of low-priority requests."""
    slo_tpot_high_s: float = Field(default=0.2, gt=0.0)
    """``slo`` policy: TPOT P99 target of high-priority requests."""
    slo_tpot_normal_s: float = Field(default=0.5, gt=0.0)
    """``slo`` policy: TPOT P99 target of normal-priority requests."""
    slo_tpot_low_s: float = Field(default=2.0, gt=0.0)
    """``slo`` policy: TPOT P99 target of low-priority requests."""
    slo_min_samples: int = Field(default=20, ge=1)
    """``slo`` policy: requests a priority's P99 needs before it is compared."""
    forecast_interval_s: float = Field(default=5.0, gt=0.0)
    """``slo`` policy: the forecasters observe the rates this often."""
    forecast_z: float = Field(default=2.0, ge=0.0)
    """``slo`` policy: headroom in standard deviations of the forecast error."""
    assumed_cold_start_s: float = Field(default=30.0, ge=0.0)
    """``slo`` policy: cold start assumed until one is observed."""
    panic_window_s: float = Field(default=60.0, ge=0.0)
    """``slo`` policy: no scale in this long after a breach."""
    panic_scale: float = Field(default=1.5, ge=1.0)
    """``slo`` policy: in a breach, at least this many times the active instances."""
    pairing_policy: str | None = None
    """Registered migration-pairing policy (``llumnix``, ``none``); unset: the
    registry's default (``llumnix``)."""
    migrate_out_below: float = 5.0
    """An instance below this freeness sends requests to a freer one."""
    migrate_in_above: float = 40.0
    """An instance above this freeness may receive them."""
    protect_above: float = 80.0
    """Freeness kept on instances serving high-priority requests (lower
    priorities migrate away below it)."""

    tick_s: float = Field(default=0.5, gt=0.0)
    """Period of the control loop."""

    lease_ttl_s: float = Field(default=5.0, gt=0.0)
    """A standby takes over this long after the leader's last renewal."""

    start_timeout_s: float = Field(default=600.0, gt=0.0)
    """A started instance not ready after this long is stopped."""

    @model_validator(mode="after")
    def _check_autoscaler(self) -> AutoscalerSettings:
        if self.lease_ttl_s <= self.tick_s:
            raise ValueError(f"lease_ttl_s ({self.lease_ttl_s}) must exceed tick_s ({self.tick_s})")
        gpus, tp = self.ray_num_gpus, self.tensor_parallel_size
        if gpus is not None and gpus > 0 and not (gpus == tp or (tp == 1 and gpus < 1)):
            raise ValueError(
                f"ray_num_gpus ({gpus}) does not fit tensor_parallel_size ({tp}): an "
                f"instance uses one GPU per rank, so ask for {tp} (or leave ray_num_gpus unset)"
            )
        if "--tensor-parallel-size" in self.instance_args:
            raise ValueError(
                "instance_args sets --tensor-parallel-size: set tensor_parallel_size instead "
                "(the autoscaler asks Ray for the GPUs it needs)"
            )
        return self

    @property
    def gpus_per_instance(self) -> float:
        """GPUs each instance asks its provider for (``ray_num_gpus``, or one
        per tensor-parallel rank of a vLLM instance)."""
        if self.ray_num_gpus is not None:
            return self.ray_num_gpus
        return float(self.tensor_parallel_size) if self.engine == "vllm" else 0.0

    @property
    def model_name(self) -> str:
        """The name the instances register under (what clients ask for)."""
        if self.served_model_name or self.model:
            return str(self.served_model_name or self.model)
        return "tiny-llama" if self.engine == "vllm" else "sim-model"


def local_cluster(run_dir: Path) -> ClusterKeys:
    """The secret of a stack on this machine (``shoal up``, benchmarks, the
    tests), unless one is configured already: generated once into
    ``run_dir/cluster-secret`` (owner-only), and set in this process's
    environment so that everything it starts joins the same cluster."""
    if not any(os.environ.get(v) for v in SECRET_VARIABLES):
        path = (run_dir / "cluster-secret").resolve()
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(new_secret() + "\n")
        os.environ["SHOAL_CLUSTER_SECRET_FILE"] = str(path)
    return CommonSettings().cluster_keys()
