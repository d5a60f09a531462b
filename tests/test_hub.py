"""Offline, a hub id fails at once (no retries): the probe meets a closed local port, nothing slow is contacted."""
import time

import pytest

from dpo_tutorial import hub
from dpo_tutorial.cli import main


@pytest.fixture
def hub_unreachable(monkeypatch):
    """The hub endpoint is a closed port on this machine: a connection is refused at once."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub, "_reached", set())


def test_sd15_preset_offline_fails_at_once_with_one_line(hub_unreachable, tmp_path, capsys):
    start = time.perf_counter()
    rc = main(["train", "--preset", "sd15", "--output-dir", str(tmp_path / "run")])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert rc == 2 and elapsed < 10, (rc, elapsed)
    assert err.count("\n") == 1 and "hub 127.0.0.1:9 unreachable" in err and "Offline?" in err


def test_probe_names_the_address_and_is_skipped_when_offline_is_asked(hub_unreachable, monkeypatch):
    assert hub.hub_address() == ("127.0.0.1", 9)
    with pytest.raises(hub.HubUnreachable, match=r"hub 127\.0\.0\.1:9 unreachable for model 'a/b'"):
        hub.check_hub_reachable("model 'a/b'", timeout=2)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.check_hub_reachable("model 'a/b'", timeout=2)  # the hub libraries use their cache: no probe
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub.hub_address() == ("proxy.example", 3128)
