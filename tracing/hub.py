"""Is the Hugging Face hub usable right now? Asked once per process, answered in at most PROBE_S seconds.

    reason = offline_reason()     # None, "HF_HUB_OFFLINE=1 is set" or "huggingface.co cannot be reached ..."
    if reason: ...                # only cached files can load; say so and name the fix

Without a network the hub client retries each request for half a minute before it gives up. One TCP
connection attempt to the endpoint tells the same in a second: when it fails, the hub client (and
transformers, datasets) are switched to their offline mode for the rest of the process, so cached models
still load and anything else fails at once with an error that names a local path as the fix.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import urllib.request
from urllib.parse import urlparse

import huggingface_hub.constants as hub_constants

PROBE_S = 1.5  # the TCP connection attempt; DNS failure is immediate
HUB_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # what switches models offline
DATASETS_VARS = (*HUB_VARS, "HF_DATASETS_OFFLINE")  # ... and datasets


def _endpoint() -> tuple[str, int]:
    """(host, port) the hub client connects to: the endpoint, or the proxy that reaches it."""
    url = urlparse(hub_constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        return p.hostname or host, p.port or 80
    return host, port


@functools.lru_cache(maxsize=1)
def _reachable() -> bool:
    """One TCP connection attempt to the hub endpoint, once per process."""
    try:
        socket.create_connection(_endpoint(), timeout=PROBE_S).close()
        return True
    except OSError:
        return False


def set_by_user(datasets: bool = False) -> str | None:
    """The offline variable the user set ('HF_HUB_OFFLINE=1'), None when none is (datasets: its own too)."""
    for var in DATASETS_VARS if datasets else HUB_VARS:
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{var}={os.environ[var]}"
    return None


def offline_reason(datasets: bool = False) -> str | None:
    """Why only cached hub files (datasets: cached datasets) can be used now; None: the hub is reachable.
    Probes the endpoint once; when it cannot be reached, huggingface_hub, transformers and datasets go
    offline for this process."""
    user = set_by_user(datasets)
    if user:
        return f"{user} is set"
    if hub_constants.HF_HUB_OFFLINE and _reachable.cache_info().currsize == 0:  # switched on in code, not probed
        return "HF_HUB_OFFLINE=1 is set"
    if _reachable():
        return None
    hub_constants.HF_HUB_OFFLINE = True  # read at every call by huggingface_hub and transformers
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
    return f"{_endpoint()[0]} cannot be reached (no network?)"


def fix(reason: str | None) -> str:
    """The advice that goes with offline_reason()."""
    if reason is None:
        return "check the id (org/name[@revision]) or pass a local path"
    if reason.endswith("is set"):
        var = reason.split("=")[0]
        return f"{reason}: pass a local path, or unset {var} to download"
    return f"{reason}: pass a local path, or run where the hub is reachable"
