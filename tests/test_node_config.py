"""The DICOM node's settings: command line over XRAY_NODE_* over defaults, and clear errors (no network)."""
from __future__ import annotations

import pytest

from xray.node.service import NodeConfig, env_defaults, parse_destination


def test_destination_and_ae_titles_are_checked():
    d = parse_destination("PACS@10.0.0.5:104")
    assert (d.ae_title, d.host, d.port, str(d)) == ("PACS", "10.0.0.5", 104, "PACS@10.0.0.5:104")
    for bad in ("PACS10.0.0.5:104", "PACS@host", "WAY_TOO_LONG_AE_TITLE@h:104", "A\\B@h:1"):
        with pytest.raises(ValueError, match="AET@HOST:PORT|AE title"):
            parse_destination(bad)
    config = NodeConfig(ae_title="XRAYAI", port=11112, destination=d)
    assert config.allowed == ["PACS"]  # by default only the destination may call
    with pytest.raises(ValueError, match="port"):
        NodeConfig(ae_title="XRAYAI", port=0, destination=d)


def test_settings_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("XRAY_NODE_AE_TITLE", "NODE1")
    monkeypatch.setenv("XRAY_NODE_PORT", "4104")
    monkeypatch.setenv("XRAY_NODE_DESTINATION", "PACS@127.0.0.1:104")
    monkeypatch.setenv("XRAY_NODE_ALLOW", "PACS, CR1")
    monkeypatch.setenv("XRAY_NODE_SPOOL", str(tmp_path / "spool"))
    monkeypatch.setenv("XRAY_NODE_SPOOL_MB", "512")
    config = NodeConfig(**env_defaults())
    assert (config.ae_title, config.port, config.allowed, config.spool, config.spool_mb) == (
        "NODE1", 4104, ["PACS", "CR1"], tmp_path / "spool", 512.0)
    monkeypatch.setenv("XRAY_NODE_PORT", "many")
    with pytest.raises(ValueError, match="XRAY_NODE_PORT"):
        env_defaults()


def test_the_command_says_what_is_missing(monkeypatch):
    from xray.cli import main

    for name in ("AE_TITLE", "DESTINATION", "PORT"):
        monkeypatch.delenv(f"XRAY_NODE_{name}", raising=False)
    with pytest.raises(SystemExit) as stopped:
        main(["node", "--port", "11112"])
    assert "missing --ae-title, --destination (or XRAY_NODE_AE_TITLE, XRAY_NODE_DESTINATION)" in str(stopped.value)
    with pytest.raises(SystemExit, match="AET@HOST:PORT"):
        main(["node", "--ae-title", "X", "--port", "11112", "--destination", "nowhere"])
