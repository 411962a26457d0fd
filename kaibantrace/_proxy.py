"""Which proxy, if any, a request must go through.

The user's proxy settings are honoured as every Python HTTP tool honours them:
``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY`` and ``NO_PROXY`` (either case),
and on macOS and Windows the system's settings, as the standard library reads
them. kaibantrace's own client (``_http``) then speaks to the proxy itself,
through a ``CONNECT`` tunnel (TLS end to end: the proxy sees only the host
name), so a proxy is under the same deadline and bounds as a direct request.

A loopback endpoint is never proxied (a proxy elsewhere would reach its own
loopback, and plain HTTP, allowed only for loopback endpoints, must not cross
a network), nor is one ``NO_PROXY`` names: by host, ``host:port``, domain
suffix, ``*``, or, for an endpoint given by address, a CIDR range.

Only proxies spoken to in plain HTTP (``http://host:port``, with optional
credentials sent as Basic authorization) are supported. Another kind (SOCKS, a
proxy reached over TLS) is never bypassed: nothing is sent, the signals wait in
the outbox, and the sender's log says why once.
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple, Optional


class Proxy(NamedTuple):
    host: str
    port: int
    authorization: Optional[str]  # the value of a Proxy-Authorization header


class UnsupportedProxy(OSError):
    """The configured proxy is of a kind kaibantrace does not speak."""


def may_be_configured() -> bool:
    """Cheaply, whether a proxy could apply: on Linux only the environment can set one,
    so a process without proxy variables never loads ``urllib.request``."""
    if sys.platform in ("darwin", "win32"):  # proxies may be system settings there
        return True
    return any(name.lower() in ("https_proxy", "all_proxy") and value.strip()
               for name, value in os.environ.items())


def proxy_for(scheme: str, host: str, port: int) -> Optional[Proxy]:
    """The proxy for a request to ``host:port`` over ``scheme``, or ``None`` to go direct;
    ``UnsupportedProxy`` for a proxy this client cannot use."""
    from ._config import is_loopback

    if scheme != "https" or is_loopback(host) or not may_be_configured():
        return None
    import urllib.request
    from urllib.parse import unquote, urlsplit

    proxies = urllib.request.getproxies()  # the environment first, then the system's settings
    setting = (proxies.get(scheme) or proxies.get("all") or "").strip()
    if not setting or _bypassed(host, port, proxies.get("no", "")):
        return None
    if "://" not in setting:  # "proxy.corp:3128" means plain HTTP, as requests and curl read it
        setting = "http://" + setting
    parts = urlsplit(setting)
    kind = parts.scheme.lower()
    if kind != "http":
        raise UnsupportedProxy(f"a {kind} proxy is configured; only http:// proxies are spoken")
    try:
        proxy_port = parts.port or 80
    except ValueError:
        raise UnsupportedProxy("the proxy's port is not a number") from None
    if not parts.hostname:
        raise UnsupportedProxy("the proxy setting names no host")
    authorization = None
    if parts.username is not None:
        import base64

        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
    return Proxy(parts.hostname, proxy_port, authorization)


def _bypassed(host: str, port: int, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` (or, on macOS and Windows, the system's exceptions) exempts
    ``host:port``. The standard library matches names, suffixes and ``host:port`` entries;
    address ranges (``10.0.0.0/8``) are matched here, for an endpoint given by address."""
    import urllib.request

    shown = f"[{host}]" if ":" in host else host
    if urllib.request.proxy_bypass(f"{shown}:{port}"):
        return True
    import ipaddress

    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    for entry in no_proxy.split(","):
        try:
            if address in ipaddress.ip_network(entry.strip(), strict=False):
                return True
        except ValueError:
            continue
    return False
