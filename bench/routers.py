"""Third-party routers the gateway benchmark compares against, installed in
their own virtualenv (they are not Shoal dependencies) and run on loopback.

- vLLM's router (``vllm-router``, Rust), round robin over the instances.
- LiteLLM proxy (Python), simple shuffle over the same instances, one worker.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import REPO, Server, free_port, tool_venv

VENV = REPO / "bench" / "out" / "routers-venv"
PACKAGES = ["vllm-router==0.1.17", "litellm[proxy]==1.106.2"]
LITELLM_KEY = "sk-bench-local"
"""LiteLLM refuses to start without a master key; every client sends it."""

LITELLM_ENV = {
    # Offline and quiet: no cost-map download, no .env loading, no docs pages.
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_LOG": "ERROR",
    "LITELLM_MODE": "PRODUCTION",
    "DISABLE_SCHEMA_UPDATE": "True",
    "NO_DOCS": "True",
    "NO_REDOC": "True",
    # Its default aiohttp transport leaks sessions and churns connections.
    "DISABLE_AIOHTTP_TRANSPORT": "True",
}


def ensure_venv() -> Path:
    """The routers' virtualenv (its ``bin``), created and filled on first use."""
    return tool_venv(VENV, PACKAGES, ["litellm", "vllm-router"])


def start_vllm_router(instances: list[str], cpus: set[int], log: Path) -> Server:
    port = free_port()
    cmd = [str(ensure_venv() / "vllm-router"), "--host", "127.0.0.1", "--port", str(port),
           "--worker-urls", *instances, "--policy", "round_robin", "--log-level", "warning",
           "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]  # fmt: skip
    return Server(cmd, f"http://127.0.0.1:{port}/health", {}, log, cpus=cpus)


def start_litellm(model: str, instances: list[str], cpus: set[int], log: Path) -> Server:
    config = log.with_suffix(".yaml")
    deployments = "".join(
        f"  - model_name: {model}\n    litellm_params:\n      model: openai/{model}\n"
        f"      api_base: {url}/v1\n      api_key: unused\n"
        for url in instances
    )
    config.write_text(
        f"model_list:\n{deployments}"
        "router_settings:\n  routing_strategy: simple-shuffle\n  num_retries: 0\n"
        "litellm_settings:\n  set_verbose: false\n  num_retries: 0\n  request_timeout: 600\n"
        f"general_settings:\n  master_key: {LITELLM_KEY}\n  disable_spend_logs: true\n"
        "  disable_error_logs: true\n  background_health_checks: false\n"
    )
    port = free_port()
    cmd = [str(ensure_venv() / "litellm"), "--config", str(config), "--host", "127.0.0.1",
           "--port", str(port), "--num_workers", "1"]  # fmt: skip
    return Server(cmd, f"http://127.0.0.1:{port}/health/liveliness", LITELLM_ENV, log, cpus=cpus)
