"""infra/deploy: the Kubernetes manifests, images, collector configuration and
dashboard refer only to what the project has. Every YAML document parses;
every `shoal` command a container or an image runs names an existing
subcommand with existing flags (checked against `python -m shoal <sub>
--help` and parsed by the real parser); every SHOAL_* variable set is a field
of the settings class of the component that reads it, with a valid value;
secrets are the expected ones (the cluster secret in the gateway and the
autoscaler, as the variables the autoscaler hands on to instances); probes
hit endpoints the component serves; the dashboard's metrics exist."""

from __future__ import annotations

import copy
import functools
import json
import re
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from autoscaler.main import worker_launch
from autoscaler.metrics import AutoscalerMetrics
from gateway.metrics import GatewayMetrics
from infra.cluster_auth import SECRET_VARIABLES, ClusterKeys
from infra.flags import given
from infra.procs import shoal_command
from infra.settings import AutoscalerSettings, GatewaySettings, InstanceSettings
from instance.engine_args import Platform, engine_args
from instance.metrics import InstanceMetrics
from shoal.cli import build_parser
from tests.deploy import DEPLOY, REPO, SETTINGS, setting_field


@dataclass(frozen=True)
class Component:
    settings: str | None
    """Key of SETTINGS read by the component's `shoal` process (None: not Shoal)."""
    probe_paths: frozenset[str]
    port: int | None = None
    """Port of the component's HTTP server (probes must use it)."""


COMPONENTS = {
    "gateway": Component("gateway", frozenset({"/readyz", "/healthz"}), 8000),
    "autoscaler": Component("autoscaler", frozenset({"/healthz"}), 8200),
    "instance": Component("instance", frozenset({"/ready", "/health"}), 8100),
    "ray-head": Component(None, frozenset({"/api/gcs_healthz", "/api/local_raylet_healthz"})),
    "otel-collector": Component(None, frozenset({"/"}), 13133),
}
# Ray worker pods host the instance processes (actors on ports of their own);
# the pod's probes are the raylet's.
RAY_WORKER_PROBES = frozenset({"/api/local_raylet_healthz"})
RAY_HEALTH_PORTS = {8265, 52365}
# Secrets and ConfigMaps the manifests expect from outside the kustomizations
# (README.md; Terraform creates them on AWS).
EXTERNAL_SECRETS = {"shoal-redis": {"url"}, "shoal-cluster": {"secret", "previous"},
                    "shoal-api-keys": {"keys.json"}, "shoal-hf-token": {"token"}}  # fmt: skip
# The cluster secret (docs/SECURITY.md): variable -> (key of secret
# shoal-cluster, optional), in the gateway and the autoscaler, which hands
# both on to the instances it starts.
CLUSTER_SECRET_ENV = {"SHOAL_CLUSTER_SECRET": ("secret", False),
                      "SHOAL_CLUSTER_SECRET_PREVIOUS": ("previous", True)}  # fmt: skip
EXTERNAL_CONFIGMAPS = {"shoal-otel-aws"}
IMAGES = {"shoal-gateway": "Dockerfile.gateway", "shoal-instance": "Dockerfile.instance"}
COLLECTOR_CONFIGS = {"otel-collector.yaml", "otel-collector-traces.yaml",
                     "overlays/aws/otel-collector-aws.yaml"}  # fmt: skip


def _yaml_files() -> list[Path]:
    return sorted(DEPLOY.rglob("*.yaml"))


def _rel(path: Path) -> str:
    return str(path.relative_to(DEPLOY))


def _is_kustomization(path: Path) -> bool:
    return path.name == "kustomization.yaml"


def _is_collector_config(path: Path) -> bool:
    return _rel(path) in COLLECTOR_CONFIGS


@functools.cache
def manifests() -> tuple[tuple[Path, dict[str, Any]], ...]:
    found = []
    for path in _yaml_files():
        if _is_kustomization(path) or _is_collector_config(path):
            continue
        found += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return tuple(found)


@functools.cache
def kustomizations() -> dict[Path, dict[str, Any]]:
    return {p.parent: yaml.safe_load(p.read_text()) for p in _yaml_files() if _is_kustomization(p)}


@functools.cache
def generated_configmaps() -> dict[str, dict[str, str]]:
    """ConfigMaps made by configMapGenerator literals, by name."""
    maps: dict[str, dict[str, str]] = {}
    for k in kustomizations().values():
        for gen in k.get("configMapGenerator", []):
            literals = dict(lit.split("=", 1) for lit in gen.get("literals", []))
            maps.setdefault(gen["name"], {}).update(literals)
    return maps


@dataclass(frozen=True)
class Container:
    where: str
    component: str
    in_ray_cluster: bool
    pod: dict[str, Any]
    spec: dict[str, Any]

    @property
    def image_name(self) -> str:
        return str(self.spec["image"]).rsplit("/", 1)[-1].split(":")[0].split("@")[0]


def _pod_templates(doc: dict[str, Any]) -> Iterator[tuple[dict[str, Any], bool]]:
    kind = doc["kind"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet"):
        yield doc["spec"]["template"], False
    elif kind == "RayCluster":
        yield doc["spec"]["headGroupSpec"]["template"], True
        for group in doc["spec"]["workerGroupSpecs"]:
            yield group["template"], True


@functools.cache
def containers() -> tuple[Container, ...]:
    found = []
    for path, doc in manifests():
        for template, in_ray in _pod_templates(doc):
            component = template["metadata"]["labels"]["app.kubernetes.io/component"]
            for spec in template["spec"]["containers"]:
                where = f"{_rel(path)}:{doc['kind']}/{doc['metadata']['name']}/{spec['name']}"
                found.append(Container(where, component, in_ray, template, spec))
    return tuple(found)


def _container_ids() -> list[str]:
    return [c.where for c in containers()]


def _container(where: str) -> Container:
    return next(c for c in containers() if c.where == where)


# ------------------------------------------------------------- images ---


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _exec_form(dockerfile: Path, op: str) -> list[str]:
    (value,) = [rest for o, rest in _instructions(dockerfile) if o == op]
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"{dockerfile.name}: {op} must be in exec form"
    return [str(a) for a in parsed]


def entrypoint(image_name: str) -> list[str]:
    return _exec_form(DEPLOY / IMAGES[image_name], "ENTRYPOINT")


# ---------------------------------------------------------------- CLI ---


@functools.cache
def cli_help(subcommand: str) -> str:
    proc = subprocess.run(
        shoal_command(subcommand, "--help"),
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, f"shoal {subcommand} --help failed:\n{proc.stderr}"
    return proc.stdout


def check_shoal_command(argv: list[str], where: str) -> None:
    """argv runs `shoal <subcommand> [--flag value ...]`: the subcommand and
    its flags exist, and the real parser accepts the values."""
    assert argv[:1] == ["shoal"], f"{where}: {argv} does not run shoal"
    assert len(argv) > 1, f"{where}: no subcommand"
    help_text = cli_help(argv[1])
    for flag in (a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")):
        assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", help_text, re.M), (
            f"{where}: `shoal {argv[1]}` has no flag {flag}"
        )
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse reports bad values by exiting
        pytest.fail(f"{where}: shoal rejects {argv[1:]} ({exc})")


def _flag(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def container_argv(c: Container) -> list[str] | None:
    """The command line of a container that runs a Shoal image with an
    explicit command or arguments (Ray's containers get theirs from KubeRay)."""
    command, args = c.spec.get("command"), c.spec.get("args")
    if c.image_name not in IMAGES or (command is None and args is None):
        return None
    return [*(command or entrypoint(c.image_name)), *(args or [])]


# ---------------------------------------------------------------- tests ---


@pytest.mark.parametrize("path", _yaml_files(), ids=_rel)
def test_every_yaml_file_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    if _is_kustomization(path) or _is_collector_config(path):
        return
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path}: not a manifest"
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "shoal", f"{path}: {doc['metadata']}"


def test_the_components_are_all_there() -> None:
    found = {c.component for c in containers()}
    assert set(COMPONENTS) <= found, f"missing: {set(COMPONENTS) - found}"
    kinds = {doc["kind"] for _, doc in manifests()}
    assert {"Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
            "RayCluster", "ExternalSecret", "SecretStore"} <= kinds  # fmt: skip


@pytest.mark.parametrize("where", _container_ids())
def test_shoal_commands_exist(where: str) -> None:
    c = _container(where)
    argv = container_argv(c)
    if argv is None:
        assert c.in_ray_cluster or c.image_name not in IMAGES, f"{where}: runs nothing"
        return
    check_shoal_command(argv, where)
    assert argv[1] == c.component, f"{where}: a {c.component} pod runs `shoal {argv[1]}`"
    component = COMPONENTS[c.component]
    assert _flag(argv, "--host") == "0.0.0.0", f"{where}: must listen on all interfaces"
    assert _flag(argv, "--port") == str(component.port), f"{where}: port"


def test_autoscaler_uses_the_ray_cluster() -> None:
    (c,) = [c for c in containers() if c.component == "autoscaler"]
    argv = container_argv(c)
    assert argv is not None
    assert _flag(argv, "--provider") == "ray"
    (cluster,) = [doc for _, doc in manifests() if doc["kind"] == "RayCluster"]
    head_service = f"{cluster['metadata']['name']}-head-svc"  # KubeRay's naming
    assert _flag(argv, "--ray-address") == f"ray://{head_service}:10001"
    settings = autoscaler_settings(c)
    (worker,) = cluster["spec"]["workerGroupSpecs"]
    gpus = worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert 1 <= settings.gpus_per_instance <= float(gpus)


def autoscaler_settings(c: Container) -> AutoscalerSettings:
    """The autoscaler container's settings, from its literal SHOAL_* values."""
    env = container_env(c)
    values = {setting_field(AutoscalerSettings, k): v for k, v in env.items() if v is not None}
    return AutoscalerSettings.model_validate({k: v for k, v in values.items() if k})


def _gpu_instances() -> list[Container]:
    """Containers that host GPU instance workers (the Ray GPU worker pods)."""
    return [c for c in containers() if c.component == "instance"
            and "nvidia.com/gpu" in c.spec.get("resources", {}).get("limits", {})]  # fmt: skip


GPU_SETTINGS = {
    "kv sizing": ("SHOAL_GPU_MEMORY_UTILIZATION", "SHOAL_KV_CACHE_BYTES"),
    "tensor parallelism": ("SHOAL_TENSOR_PARALLEL_SIZE",),
}
"""What a GPU instance definition sets explicitly (one of each group)."""


def test_the_gpu_settings_checked_exist() -> None:
    for names in GPU_SETTINGS.values():
        for name in names:
            assert setting_field(InstanceSettings, name), f"{name} is no InstanceSettings field"
    assert setting_field(AutoscalerSettings, "SHOAL_TENSOR_PARALLEL_SIZE")


@pytest.mark.parametrize("where", [c.where for c in _gpu_instances()])
def test_gpu_instances_set_kv_sizing_and_tensor_parallelism(where: str) -> None:
    """Every GPU instance definition sets how its KV cache is sized and how
    many GPUs it spans; with the autoscaler's launch arguments they choose
    vLLM's own sizing and graphs on a GPU node of the pod's size, and the
    autoscaler asks Ray for as many GPUs per instance as one spans."""
    c = _container(where)
    env = container_env(c)
    for what, names in GPU_SETTINGS.items():
        assert any(env.get(n) for n in names), f"{where}: sets none of {names} ({what})"
    (autoscaler,) = [a for a in containers() if a.component == "autoscaler"]
    scaler = autoscaler_settings(autoscaler)
    launch = worker_launch(scaler, "redis://unused:6379/0")
    args = build_parser().parse_args(["instance", *launch.args])
    values = {setting_field(InstanceSettings, k): v for k, v in env.items() if v is not None}
    explicit = {k: v for k, v in values.items() if k} | given(args, InstanceSettings)
    settings = InstanceSettings(**explicit)  # the launch arguments win, as in `shoal instance`
    tp = int(env["SHOAL_TENSOR_PARALLEL_SIZE"] or 0)
    assert settings.tensor_parallel_size == tp == scaler.tensor_parallel_size, (
        f"{where}: the instances' tensor_parallel_size ({tp}) is not the autoscaler's "
        f"({scaler.tensor_parallel_size})"
    )
    pod_gpus = int(c.spec["resources"]["limits"]["nvidia.com/gpu"])
    assert scaler.gpus_per_instance == tp <= pod_gpus, f"{where}: GPUs per instance"
    chosen = engine_args(settings, Platform("cuda", ("GPU",) * pod_gpus), scaler.model or "m")
    assert chosen.enforce_eager is False
    if settings.kv_cache_bytes is None:
        assert chosen.gpu_memory_utilization == float(env["SHOAL_GPU_MEMORY_UTILIZATION"] or 0)
    assert chosen.kv_cache_memory_bytes == settings.kv_cache_bytes  # never the CPU default


def container_env(c: Container) -> dict[str, str | None]:
    """Variables a container gets: ConfigMaps (generated literals) and its own
    env (None where the value comes from a secret or a field)."""
    env: dict[str, str | None] = {}
    for ref in c.spec.get("envFrom", []):
        name = ref["configMapRef"]["name"]
        if name in EXTERNAL_CONFIGMAPS:
            continue
        assert name in generated_configmaps(), f"{c.where}: no ConfigMap {name}"
        env.update(generated_configmaps()[name])
    for var in c.spec.get("env", []):
        env[var["name"]] = var.get("value")
    return env


@pytest.mark.parametrize("where", _container_ids())
def test_settings_exist_and_are_valid(where: str) -> None:
    """SHOAL_* variables are fields of the component's settings class, and
    their literal values validate."""
    c = _container(where)
    env = container_env(c)
    shoal_vars = {k: v for k, v in env.items() if k.startswith("SHOAL_")}
    settings_key = COMPONENTS[c.component].settings
    if settings_key is None:
        assert not shoal_vars, f"{where}: SHOAL_* variables on a non-Shoal container"
        return
    settings = SETTINGS[settings_key]
    values: dict[str, Any] = {}
    for name, value in shoal_vars.items():
        field = setting_field(settings, name)
        assert field, f"{where}: {name} is no field of {settings.__name__}"
        if value is not None:
            values[field] = value
    settings(**values)  # raises ValidationError on a bad value


@pytest.mark.parametrize("where", _container_ids())
def test_secrets_and_files_line_up(where: str) -> None:
    c = _container(where)
    for var in c.spec.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["key"] in EXTERNAL_SECRETS.get(ref["name"], set()), f"{where}: {ref}"
    mounts = {m["name"]: m["mountPath"] for m in c.spec.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in c.pod["spec"].get("volumes", [])}
    assert set(mounts) <= set(volumes), f"{where}: mounts without volumes"
    keys_file = container_env(c).get("SHOAL_KEYS_FILE")
    if keys_file:
        directory, name = keys_file.rsplit("/", 1)
        (volume,) = [volumes[v] for v, path in mounts.items() if path == directory]
        assert volume["secret"]["secretName"] == "shoal-api-keys"
        assert name in EXTERNAL_SECRETS["shoal-api-keys"]


def test_gateway_and_autoscaler_get_the_cluster_secret() -> None:
    """The gateway and the autoscaler read the cluster secret (and, during a
    rotation, the previous one) from secret shoal-cluster; the autoscaler
    hands exactly these variables on to every instance it starts, so no
    other container sets any cluster-secret variable, and none opens the
    cluster."""
    for name in CLUSTER_SECRET_ENV:
        assert setting_field(SETTINGS["common"], name), f"{name} is no setting"
    handed_on = ClusterKeys.of("current", "previous").env()
    assert set(handed_on) == set(CLUSTER_SECRET_ENV)
    scaler = AutoscalerSettings(cluster_secret="current", cluster_secret_previous="previous")
    launch = worker_launch(scaler, "redis://unused:6379/0")
    assert {k: launch.env.get(k) for k in handed_on} == handed_on
    for component in ("gateway", "autoscaler"):
        (c,) = [c for c in containers() if c.component == component]
        refs = {v["name"]: v.get("valueFrom", {}).get("secretKeyRef") for v in c.spec["env"]}
        for name, (key, optional) in CLUSTER_SECRET_ENV.items():
            ref = refs.get(name)
            assert ref, f"{c.where}: {name} does not come from a secret"
            got = (ref["name"], ref["key"], ref.get("optional", False))
            assert got == ("shoal-cluster", key, optional), f"{c.where}: {name} from {ref}"
    cluster_vars = set(CLUSTER_SECRET_ENV) | set(SECRET_VARIABLES)
    for c in containers():
        names = set(container_env(c))
        if c.component in ("gateway", "autoscaler"):
            names -= set(CLUSTER_SECRET_ENV)
        assert not names & cluster_vars, f"{c.where}: sets {sorted(names & cluster_vars)}"


@pytest.mark.parametrize("where", _container_ids())
def test_probes_hit_endpoints_the_component_serves(where: str) -> None:
    c = _container(where)
    component = COMPONENTS[c.component]
    ports = {p["name"]: p["containerPort"] for p in c.spec.get("ports", [])}
    ray_worker = c.in_ray_cluster and c.component == "instance"
    allowed = RAY_WORKER_PROBES if ray_worker else component.probe_paths
    for kind in ("readinessProbe", "livenessProbe"):
        probe = c.spec.get(kind)
        assert probe, f"{where}: no {kind}"
        http = probe["httpGet"]
        assert http["path"] in allowed, f"{where}: {kind} {http['path']} not in {sorted(allowed)}"
        port = ports.get(http["port"], http["port"])
        if c.in_ray_cluster:
            assert port in RAY_HEALTH_PORTS, f"{where}: {kind} port {port}"
        else:
            assert port == component.port, f"{where}: {kind} port {port} != {component.port}"


@pytest.mark.parametrize("where", _container_ids())
def test_containers_are_locked_down(where: str) -> None:
    c = _container(where)
    pod, sec = c.pod["spec"].get("securityContext", {}), c.spec.get("securityContext", {})
    assert pod.get("runAsNonRoot") and pod.get("runAsUser", 0) >= 10000, f"{where}: root"
    assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert sec.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation"
    assert sec.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities"
    res = c.spec.get("resources", {})
    assert {"cpu", "memory"} <= set(res.get("requests", {})) and res.get("limits"), where


def test_scrape_annotations_name_declared_ports() -> None:
    """The collector keeps one target per pod: the declared container port
    named by prometheus.io/port."""
    scraped = set()
    for c in containers():
        annotations = c.pod["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") != "true":
            continue
        scraped.add(c.component)
        port = int(annotations["prometheus.io/port"])
        declared = {p["containerPort"] for p in c.spec.get("ports", [])}
        assert port in declared, f"{c.where}: port {port} not declared"
        assert annotations["prometheus.io/path"] == "/metrics"
        assert port == COMPONENTS[c.component].port, f"{c.where}: scrapes {port}"
    assert scraped == {"gateway", "autoscaler", "instance"}
    # Instances listen where their pod is scraped: the autoscaler's extra
    # `shoal instance` arguments fix the port (the provider picks a free one).
    (autoscaler,) = [c for c in containers() if c.component == "autoscaler"]
    instance_args = (container_env(autoscaler).get("SHOAL_INSTANCE_ARGS") or "").split()
    assert _flag(instance_args, "--port") == str(COMPONENTS["instance"].port)
    check_shoal_command(["shoal", "instance", *instance_args], "SHOAL_INSTANCE_ARGS")


def test_network_policies_admit_the_served_ports() -> None:
    """Ingress is denied by default; each component admits its own port."""
    policies = [doc for _, doc in manifests() if doc["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") for p in policies)
    admitted: dict[str, set[int]] = {}
    for policy in policies:
        labels = policy["spec"]["podSelector"].get("matchLabels", {})
        key = labels.get("app.kubernetes.io/component") or labels.get("ray.io/node-type", "")
        for rule in policy["spec"].get("ingress", []):
            admitted.setdefault(key, set()).update(p["port"] for p in rule.get("ports", []))
    for component in ("gateway", "autoscaler"):
        assert admitted[component] == {COMPONENTS[component].port}, component
    (autoscaler,) = [c for c in containers() if c.component == "autoscaler"]
    ray_address = _flag(container_argv(autoscaler) or [], "--ray-address") or ""
    assert int(ray_address.rsplit(":", 1)[1]) in admitted["head"]


def test_external_secrets_provide_the_expected_keys() -> None:
    provided = {}
    for _, doc in manifests():
        if doc["kind"] == "ExternalSecret":
            provided[doc["spec"]["target"]["name"]] = {d["secretKey"] for d in doc["spec"]["data"]}
    assert provided == {k: v for k, v in EXTERNAL_SECRETS.items() if k != "shoal-hf-token"}


def test_kustomizations_reference_existing_files() -> None:
    images_used = {c.image_name for c in containers() if c.image_name in IMAGES}
    for directory, k in kustomizations().items():
        for resource in k.get("resources", []):
            assert (directory / resource).exists(), f"{directory}: {resource}"
        for gen in k.get("configMapGenerator", []):
            for spec in gen.get("files", []):
                assert (directory / spec.split("=", 1)[-1]).is_file(), f"{directory}: {spec}"
    top = kustomizations()[DEPLOY]
    assert {i["name"] for i in top["images"]} == images_used


# --------------------------------------------------------- Dockerfiles ---


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_images_run_existing_commands(image: str) -> None:
    dockerfile = DEPLOY / IMAGES[image]
    argv = entrypoint(image) + _exec_form(dockerfile, "CMD")
    check_shoal_command(argv, dockerfile.name)
    component = COMPONENTS[argv[1]]
    instructions = _instructions(dockerfile)
    code = " ".join(rest for op, rest in instructions if op in ("ENV", "HEALTHCHECK"))
    for port, path in re.findall(r"http://127\.0\.0\.1:(\d+)(/[\w/]*)", code):
        assert int(port) == component.port and path in component.probe_paths, (
            f"{dockerfile.name}: health check {port}{path}"
        )
    users = [rest for op, rest in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), f"{dockerfile.name}: root"
    assert any(op == "HEALTHCHECK" for op, _ in instructions)
    for op, rest in instructions:
        for name in re.findall(r"\b(SHOAL_[A-Z0-9_]+)=", rest) if op == "ENV" else []:
            assert setting_field(SETTINGS["common"], name), f"{dockerfile.name}: {name}"


def test_images_match_the_project() -> None:
    """The images copy every package, the instance image's vLLM is the `gpu`
    extra's, and the gateway image has no GPU libraries."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {
        p.split(".")[0] for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    (vllm_pin,) = [d for d in pyproject["project"]["optional-dependencies"]["gpu"] if "vllm" in d]
    for dockerfile in IMAGES.values():
        copied = {
            rest.split()[0] for op, rest in _instructions(DEPLOY / dockerfile) if op == "COPY"
        }
        assert packages <= copied, f"{dockerfile}: does not copy {packages - copied}"
        assert {"pyproject.toml"} <= {c for r in copied for c in r.split()}
    instance = (DEPLOY / "Dockerfile.instance").read_text()
    (version,) = re.findall(r"^ARG VLLM_VERSION=(\S+)$", instance, re.M)
    assert vllm_pin == f"vllm=={version}", f"{vllm_pin} vs vllm/vllm-openai:v{version}"
    assert re.search(r'"\.\[gpu,ray\]"', instance), "the instance image installs .[gpu,ray]"
    gateway = (DEPLOY / "Dockerfile.gateway").read_text().lower()
    assert not re.search(r"\b(vllm|torch|cuda|nvidia)\b|\[(gpu|cpu)\]", gateway.split("from", 1)[1])


# ----------------------------------------------- dashboard and collector ---


@functools.cache
def exported_metrics() -> frozenset[str]:
    """Every series name Shoal exports (counters get _total, histograms
    _bucket/_sum/_count, as prometheus_client writes them)."""
    names = set()
    for make in (GatewayMetrics, InstanceMetrics, AutoscalerMetrics):
        registry = CollectorRegistry()
        make(registry)
        for family in registry.collect():
            if family.type == "counter":
                names.add(f"{family.name}_total")
            elif family.type == "histogram":
                names.update(f"{family.name}{s}" for s in ("_bucket", "_sum", "_count"))
            else:
                names.add(family.name)
    return frozenset(names)


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def test_dashboard_uses_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\bshoal_[a-z0-9_]+", e)}
    unknown = used - exported_metrics()
    assert not unknown, f"dashboard queries metrics Shoal does not export: {sorted(unknown)}"
    # Request rate, TTFT/TPOT by priority, instances by state, freeness per
    # instance, migrations, cost.
    assert {
        "shoal_gateway_requests_total", "shoal_gateway_time_to_first_token_seconds_bucket",
        "shoal_gateway_time_per_output_token_seconds_bucket", "shoal_autoscaler_instances",
        "shoal_instance_freeness", "shoal_instance_migrations_total",
        "shoal_autoscaler_migrations_total", "shoal_autoscaler_instance_seconds_total",
    } <= used  # fmt: skip
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))
    for p in _panels(dashboard):
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "gpu_hour_usd"} <= variables


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """The collector merges --config files: maps deeply, lists replaced."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


@pytest.mark.parametrize(
    "files",
    [("otel-collector.yaml",), ("otel-collector.yaml", "otel-collector-traces.yaml"),
     ("otel-collector.yaml", "overlays/aws/otel-collector-aws.yaml", "otel-collector-traces.yaml")],
    ids=["base", "traces", "aws+traces"],
)  # fmt: skip
def test_collector_pipelines_are_complete(files: tuple[str, ...]) -> None:
    config: dict[str, Any] = {}
    for name in files:
        config = _merge(config, yaml.safe_load((DEPLOY / name).read_text()))
    service = config["service"]
    for ext in service.get("extensions", []):
        assert ext in config["extensions"], f"{files}: extension {ext}"
    for pipeline, spec in service["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for part in spec.get(kind, []):
                assert part in config[kind], f"{files}: {pipeline} uses undefined {kind} {part}"
    assert "prometheus" in config["receivers"] and "otlp" in config["receivers"]


# ----------------------------------------------------- TLS component ---
TLS_KEYS = {"tls.crt", "tls.key", "ca.crt"}
"""Keys of secret `shoal-tls` (as cert-manager writes them)."""


def _json_patch_add(doc: dict[str, Any], path: str, value: Any) -> None:
    """RFC 6902 ``add`` (what the component uses): a key, or ``-`` to append."""
    *parents, last = [p for p in path.split("/") if p]
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node.append(value) if last == "-" else node.insert(int(last), value)
    else:
        node[last] = value


def _with_tls() -> dict[str, dict[str, Any]]:
    """The base manifests the TLS component patches, patched, by name."""
    component = yaml.safe_load((DEPLOY / "components/tls/kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    patched = {}
    for p in component["patches"]:
        target = p["target"]
        (doc,) = [copy.deepcopy(d) for _, d in manifests() if d["kind"] == target["kind"]
                  and d["metadata"]["name"] == target["name"]]  # fmt: skip
        for op in yaml.safe_load(p["patch"]):
            assert op["op"] == "add", op
            _json_patch_add(doc, op["path"], op["value"])
        patched[target["name"]] = doc
    return patched


def test_the_tls_component_gives_every_member_the_same_certificate_files() -> None:
    """Every `SHOAL_TLS_*` file the gateway and the autoscaler name is a key of
    secret `shoal-tls` mounted where they read it; the Ray workers (where the
    autoscaler's instances run, with its variables) mount it at the same
    path; the settings validate."""
    patched = _with_tls()
    assert set(patched) == {"shoal-gateway", "shoal-autoscaler", "shoal-ray"}
    ray_pod = patched["shoal-ray"]["spec"]["workerGroupSpecs"][0]["template"]
    ray_mounts = {
        m["name"]: m["mountPath"] for m in ray_pod["spec"]["containers"][0]["volumeMounts"]
    }
    tls_variables = {}
    for name, settings in (
        ("shoal-gateway", GatewaySettings),
        ("shoal-autoscaler", AutoscalerSettings),
    ):
        pod = patched[name]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        volume = next(v for v in pod["volumes"] if v["name"] == "shoal-tls")
        assert volume["secret"]["secretName"] == "shoal-tls"
        keys = {i["key"] for i in volume["secret"].get("items", [])} or TLS_KEYS
        assert keys <= TLS_KEYS
        mount = next(m for m in container["volumeMounts"] if m["name"] == "shoal-tls")
        env = {
            v["name"]: v["value"] for v in container["env"] if v["name"].startswith("SHOAL_TLS_")
        }
        for var, value in env.items():
            if var.endswith("_FILE"):
                directory, key = value.rsplit("/", 1)
                assert directory == mount["mountPath"] and key in keys, (name, var, value)
                assert ray_mounts["shoal-tls"] == directory
        values: dict[str, str] = {}
        for var, value in env.items():
            field = setting_field(settings, var)
            assert field, f"{var} is no {settings.__name__} field"
            values[field] = value
        settings.model_validate(values)
        tls_variables[name] = env
    gateway, autoscaler = tls_variables["shoal-gateway"], tls_variables["shoal-autoscaler"]
    assert "SHOAL_TLS_CA_FILE" in gateway and "SHOAL_TLS_CERT_FILE" in autoscaler
    assert gateway["SHOAL_TLS_CHECK_HOSTNAME"] == autoscaler["SHOAL_TLS_CHECK_HOSTNAME"]
