"""Is an ingest URL usable? The checks, pure and cheap, that every layer shares.

Plain ``http`` is allowed only to a loopback host, so a typo can never send
signals in clear text across a network; a space or control character in a URL
would break the HTTP request line, so no such URL is ever used. Configuration
checks a URL given in code with these (and raises), the transport checks every
URL once more before a request.
"""

from __future__ import annotations

from typing import Optional


def endpoint_problem(url: str) -> Optional[str]:
    """What is wrong with an ingest URL, or ``None`` when it is usable.

    Plain ``http`` is allowed only to a loopback host, so a typo can never send
    signals in clear text across a network.
    """
    if not isinstance(url, str):
        return "must be a string"
    if breaks_a_request_line(url):
        return "must not hold spaces or control characters"
    from urllib.parse import urlsplit  # deferred, as below: only a configured URL needs it

    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return "is not a valid URL"
    if not host.isascii() and not _is_idna(host):
        return "has a host name that IDNA cannot encode, so no request could reach it"
    if parts.scheme == "https" and host:
        return None
    if parts.scheme == "http" and is_loopback(host):
        return None
    if parts.scheme == "http":
        return "must use https:// unless the host is loopback (127.0.0.1, ::1, localhost)"
    return "must be an https:// URL"


def _is_idna(host: str) -> bool:
    """Whether an internationalised host name can be sent: as ``requests`` encodes it
    (with ``idna``, which comes with it), or, in a browser page, which has no ``requests``
    and whose ``fetch`` encodes it, by Python's own IDNA codec. That codec follows the
    older IDNA 2003 rules where browsers follow UTS 46, so for a few unusual names the
    check here and the browser's encoding may differ; an ASCII host never differs."""
    try:
        import idna  # loaded only for a host name that is not ASCII
    except ImportError:
        try:
            host.encode("idna")
        except UnicodeError:
            return False
        return True
    try:
        idna.encode(host, uts46=True)
    except (idna.IDNAError, UnicodeError, ValueError):
        return False
    return True


def breaks_a_request_line(url: str) -> bool:
    """Whether ``url`` holds a space or control character, which in an HTTP request line
    would end it early or start a header of the URL's choosing."""
    return any(c <= " " or c == "\x7f" for c in url)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface."""
    if host == "localhost":
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
