"""Typed settings: environment overrides and cross-field checks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from infra.settings import InstanceSettings


def test_environment_overrides_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_REDIS_URL", "redis://example:1/0")
    monkeypatch.setenv("SHOAL_ENGINE", "sim")
    monkeypatch.setenv("SHOAL_REPORT_INTERVAL_S", "0.1")
    s = InstanceSettings()
    assert (s.redis_url, s.engine, s.report_interval_s) == ("redis://example:1/0", "sim", 0.1)


def test_invalid_values_name_the_field() -> None:
    with pytest.raises(ValidationError, match="report_interval_s"):
        InstanceSettings(report_interval_s=0)
    with pytest.raises(ValidationError, match=r"max_model_len \(16\) must be >= block_size \(32\)"):
        InstanceSettings(max_model_len=16, block_size=32)


def test_every_field_is_documented() -> None:
    import ast
    import inspect

    import infra.settings as mod

    tree = ast.parse(inspect.getsource(mod))
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                documented = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                assert documented, f"{cls.name}.{ast.unparse(node.target)} has no docstring"
