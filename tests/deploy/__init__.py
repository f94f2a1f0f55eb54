"""Checks of the cloud deployment (terraform/, infra/deploy/) that run without
a cloud, a Terraform binary or a cluster."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings

from infra.settings import AutoscalerSettings, CommonSettings, GatewaySettings, InstanceSettings

REPO = Path(__file__).resolve().parents[2]
TERRAFORM = REPO / "terraform"
DEPLOY = REPO / "infra" / "deploy"

SETTINGS: dict[str, type[BaseSettings]] = {
    "common": CommonSettings,
    "gateway": GatewaySettings,
    "autoscaler": AutoscalerSettings,
    "instance": InstanceSettings,
}


def setting_field(settings: type[BaseSettings], env_name: str) -> str | None:
    """The settings field an environment variable sets (``SHOAL_`` + field
    name, upper-cased), or None."""
    prefix = "SHOAL_"
    if not env_name.startswith(prefix):
        return None
    field = env_name[len(prefix) :].lower()
    return field if field in settings.model_fields else None
