"""Every XRAY_* setting (xray.settings): defaults outside the repository, and what each variable changes."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from xray import settings

VARIABLES = ("XRAY_WEIGHTS", "XRAY_DATA_ROOTS", "XRAY_AUDIT_LOG", "XRAY_CACHE", "XRAY_DATA", "XRAY_ROLES",
             "XRAY_SIGN_IN_HOURS", "XRAY_ALLOW_UNAUTHENTICATED_NETWORK")


@pytest.fixture
def clean(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults_are_user_folders_outside_the_repository(clean):
    for path in (settings.user_data_dir(), settings.cache_dir(), settings.registry_path(), settings.audit_log_path()):
        assert not path.resolve().is_relative_to(settings.PACKAGE_ROOT), path
    assert settings.registry_path() == settings.site_registry_path() == settings.user_data_dir() / "registry"
    assert settings.audit_log_path() == settings.user_data_dir() / "audit.jsonl"
    assert not settings.registry_overridden() and settings.data_roots() == [Path.home().resolve()]
    assert settings.SHIPPED_REGISTRY == settings.PACKAGE_ROOT / "weights"


def test_each_variable_changes_its_setting(clean, tmp_path):
    clean.setenv("XRAY_DATA", str(tmp_path / "data"))
    clean.setenv("XRAY_CACHE", str(tmp_path / "cache"))
    assert settings.user_data_dir() == tmp_path / "data" and settings.cache_dir() == tmp_path / "cache"
    assert settings.audit_log_path() == tmp_path / "data" / "audit.jsonl"  # follows the data folder
    clean.setenv("XRAY_WEIGHTS", f"  {tmp_path / 'weights'}  ")  # surrounding spaces are not part of a path
    assert settings.registry_overridden() and settings.registry_path() == tmp_path / "weights"
    clean.setenv("XRAY_AUDIT_LOG", str(tmp_path / "a.jsonl"))
    assert settings.audit_log_path() == tmp_path / "a.jsonl"


@pytest.mark.parametrize("value", ["off", "OFF", "0", "false", "none"])
def test_the_audit_log_can_be_switched_off(clean, value):
    clean.setenv("XRAY_AUDIT_LOG", value)
    assert settings.audit_log_path() is None


def test_data_roots_are_separated_by_the_platform_separator_and_resolved(clean, tmp_path):
    (tmp_path / "a").mkdir()
    clean.setenv("XRAY_DATA_ROOTS", os.pathsep.join([str(tmp_path / "a"), "", str(tmp_path / "b" / "..")]))
    assert settings.data_roots() == [(tmp_path / "a").resolve(), tmp_path.resolve()]
    assert f"separated by '{os.pathsep}'" in settings.data_roots_help() and "restart the server" in settings.data_roots_help()


def test_sign_in_settings(clean, tmp_path):
    assert settings.roles_path() == settings.user_data_dir() / "roles.toml" and settings.read_roles() == {}
    assert settings.sign_in_max_hours() == 12 and not settings.allow_unauthenticated_network()
    clean.setenv("XRAY_ROLES", str(tmp_path / "r.toml"))
    (tmp_path / "r.toml").write_text('[users]\n"a@b.example" = "clinician"\n')
    assert settings.read_roles() == {"users": {"a@b.example": "clinician"}}
    clean.setenv("XRAY_SIGN_IN_HOURS", "0.5")
    assert settings.sign_in_max_hours() == 0.5
    for bad in ("0", "-1", "soon", "nan"):
        clean.setenv("XRAY_SIGN_IN_HOURS", bad)
        with pytest.raises(ValueError, match="XRAY_SIGN_IN_HOURS must be a positive number"):
            settings.sign_in_max_hours()
    clean.setenv("XRAY_ALLOW_UNAUTHENTICATED_NETWORK", "1")
    assert settings.allow_unauthenticated_network()
