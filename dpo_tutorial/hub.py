"""A fast check that the Hugging Face Hub can be reached, made before a hub id is loaded.

Without it, an offline ``dpo-tutorial train --preset sd15`` spends ~26 s in huggingface_hub's retries
before its error. :func:`check_hub_reachable` opens one TCP connection to the hub endpoint (or to the
HTTPS proxy, when one is set) with a short timeout and raises :class:`HubUnreachable` at once when that
fails. With ``HF_HUB_OFFLINE=1`` it checks nothing: the hub libraries then read their local cache only.
"""
from __future__ import annotations

import os
import socket
import threading
import urllib.parse

PROBE_TIMEOUT_S = 3.0
DEFAULT_ENDPOINT = "https://huggingface.co"
_reached: set[tuple[str, int]] = set()  # addresses already reached in this process


def is_hub_id(source: str) -> bool:
    """Whether ``source`` names a Hugging Face Hub repository (``owner/name``) rather than a local path.

    One rule for models and datasets: exactly one ``/``, not starting with ``.``, ``/`` or ``~``, and not
    a ``.parquet`` file. Anything else is a path, and a path that does not exist is an error.
    """
    return (source.count("/") == 1 and not source.startswith((".", "/", "~"))
            and not source.endswith(".parquet"))


class HubUnreachable(ConnectionError):
    """The Hugging Face Hub (or the proxy in front of it) did not accept a connection."""


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks the hub libraries to use their local cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_address() -> tuple[str, int]:
    """``(host, port)`` a hub request connects to first: the HTTPS proxy if set, else ``HF_ENDPOINT``."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urllib.parse.urlsplit(proxy or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    default_port = 443 if url.scheme == "https" else 80
    return url.hostname or "", url.port or default_port


def _connects(address: tuple[str, int], timeout: float) -> str | None:
    """``None`` when a TCP connection to ``address`` opens within ``timeout`` s, else why not."""
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"{type(err).__name__}: {err}")

    worker = threading.Thread(target=attempt, daemon=True)  # bounds a slow DNS lookup too
    worker.start()
    worker.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def check_hub_reachable(what: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`HubUnreachable` naming ``what`` (the hub id asked for) if the hub cannot be reached."""
    if hub_offline():
        return
    address = hub_address()
    if address in _reached:
        return
    why = _connects(address, timeout)
    if why is not None:
        raise HubUnreachable(f"hub {address[0]}:{address[1]} unreachable for {what} ({why[:60]}); "
                             "HF_HUB_OFFLINE=1 uses the HF cache")
    _reached.add(address)
