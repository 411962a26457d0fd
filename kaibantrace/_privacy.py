"""The privacy guard: refuse payload text that looks like personal data.

A field is refused when its key or value contains an e-mail address, an IPv4
or IPv6 address, the user's home directory (so any absolute path under it),
the user's login name or this machine's host name as a word of its own
(unless it is a shared service account such as ``root`` or ``runner``), a
MAC address, or a long token-like secret. The
text is checked as written, URL-decoded, lower-cased, and with either kind of
path separator, so simple disguises do not get through.

The guard only answers "refuse, and why". Dropping the field and logging a
warning that names the key (never the value) is the pipeline's job.

What it does not do: prove that text is anonymous. It catches the mistakes an
author is likely to make; it is not a substitute for sending coarse values.
"""

from __future__ import annotations

import os
import re
from typing import Dict, Optional, Tuple

from ._fork import guard as fork_guard

_EMAIL = re.compile(r"[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)+")
_IPV4 = re.compile(r"(?<![\d.])(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?![\d])")
_IPV6_CANDIDATE = re.compile(r"[0-9a-f]{0,4}(?::[0-9a-f]{0,4}){2,7}(?:%[0-9a-z]+)?")
_MAC = re.compile(r"(?<![0-9a-f])[0-9a-f]{2}([:-])(?:[0-9a-f]{2}\1){4}[0-9a-f]{2}(?![0-9a-f])")
_TOKEN_RUN = re.compile(r"[A-Za-z0-9_+/=-]{24,}")
_SECRET_PREFIXES = ("sk-", "sk_live_", "pk_live_", "ghp_", "gho_", "ghs_", "github_pat_",
                    "xoxb-", "xoxp-", "akia", "eyj", "glpat-", "hf_")

# Shared service accounts name no person, and their names are common words
# ("app", "runner", "node") that would refuse ordinary values.
_GENERIC_ACCOUNTS = frozenset({
    "root", "admin", "administrator", "user", "app", "runner", "ci", "jenkins", "docker", "node",
    "ubuntu", "debian", "ec2-user", "www-data", "nobody", "vagrant", "gitlab-runner", "circleci",
    "build", "builder", "worker", "daemon", "service", "default", "guest",
})

_local: Optional[Tuple[str, ...]] = None


def _local_markers() -> Tuple[str, ...]:
    """This machine's home directory and user name, lower-cased, found once."""
    global _local
    if _local is None:
        markers = []
        with fork_guard("setup"):  # without HOME, this reads the password database too
            home = os.path.expanduser("~")
        if home and home not in ("~", "/", "\\"):
            markers.append(home.replace("\\", "/").rstrip("/").lower())
        _local = tuple(markers)
    return _local


_user: Optional[str] = None
_user_known = False
_host: Optional[str] = None
_words: Tuple[Tuple[str, re.Pattern[str]], ...] = ()  # (kind, the user or host name as a word)

# Verdicts on short texts, which repeat a lot (keys, enum-like values): at most
# this many are kept, and all are forgotten when the machine's markers are.
_CACHE_SIZE = 4096
_CACHEABLE_LENGTH = 256
_verdicts: Dict[str, Optional[str]] = {}
_UNKNOWN = object()


def _user_name() -> Optional[str]:
    global _user, _user_known, _host, _words
    if not _user_known:
        # Under the fork guard: where no variable names the user, getpass imports pwd and
        # asks the C library, which holds locks of its own meanwhile; a fork landing then
        # would leave the child's first check waiting for them forever.
        with fork_guard("setup"):
            import getpass  # deferred, like the other lookups: a cost only if a payload is checked
            import socket

            try:
                name = getpass.getuser().strip().lower()
            except Exception:  # no passwd entry, no variables: nothing to compare
                name = ""
            try:
                host = socket.gethostname().split(".")[0].strip().lower()
            except OSError:
                host = ""
        _user = name if len(name) >= 2 and name not in _GENERIC_ACCOUNTS else None
        _host = host if len(host) >= 3 and host not in ("localhost", "localhost6") else None
        _words = tuple((kind, re.compile(rf"(?<![a-z0-9_]){re.escape(word)}(?![a-z0-9_])"))
                       for kind, word in (("the user name", _user), ("the host name", _host))
                       if word is not None)
        _user_known = True
    return _user


def forget_local_markers() -> None:
    """Look the home directory and user name up again at the next check (tests)."""
    global _local, _user, _user_known, _host, _words
    _local, _user, _user_known, _host, _words = None, None, False, None, ()
    _verdicts.clear()


def _variants(text: str) -> Tuple[str, ...]:
    """The text lower-cased, URL-decoded (twice), and with ``/`` for ``\\``, each once."""
    lowered = text.lower()
    if "%" in lowered:
        from urllib.parse import unquote

        decoded = unquote(unquote(lowered))
    else:
        decoded = lowered
    slashed = decoded.replace("\\", "/")
    if decoded == lowered:
        return (lowered,) if slashed == lowered else (lowered, slashed)
    return (lowered, decoded) if slashed == decoded else (lowered, decoded, slashed)


def personal_data_kind(text: str) -> Optional[str]:
    """What kind of personal data ``text`` seems to hold, or ``None``."""
    if not text:
        return None
    cacheable = len(text) <= _CACHEABLE_LENGTH
    if cacheable:
        verdict = _verdicts.get(text, _UNKNOWN)
        if verdict is not _UNKNOWN:
            return verdict  # type: ignore[return-value]
    verdict = _check(text)
    if cacheable:
        if len(_verdicts) >= _CACHE_SIZE:
            _verdicts.clear()  # cheaper than tracking use; the common texts come back at once
        _verdicts[text] = verdict
    return verdict


def _check(text: str) -> Optional[str]:
    for variant in _variants(text):
        kind = _kind(variant)
        if kind is not None:
            return kind
    return _secret_kind(text)


def _kind(text: str) -> Optional[str]:
    if "@" in text and _EMAIL.search(text):
        return "an e-mail address"
    for home in _local_markers():
        if home in text:
            return "a path in the home directory"
    _user_name()
    for kind, word in _words:
        if word.search(text):
            return kind
    if _MAC.search(text):
        return "a hardware address"
    if "." in text:
        for match in _IPV4.finditer(text):
            if all(int(part) <= 255 for part in match.groups()):
                return "an IP address"
    if text.count(":") >= 2:
        import ipaddress

        for match in _IPV6_CANDIDATE.finditer(text):
            for candidate in _trimmed(match.group(0).split("%")[0]):
                try:
                    ipaddress.IPv6Address(candidate)
                except ValueError:
                    continue
                return "an IP address"
    return None


def _trimmed(candidate: str) -> Tuple[str, ...]:
    """The candidate, then without colons of the text around it ("addr: 2001:db8::1::"):
    the address may end where the surrounding punctuation begins."""
    return tuple(dict.fromkeys((candidate, candidate.rstrip(":"), candidate.lstrip(":"),
                                candidate.strip(":"))))


def _secret_kind(text: str) -> Optional[str]:
    for match in _TOKEN_RUN.finditer(text):
        run = match.group(0)
        if run.lower().startswith(_SECRET_PREFIXES):
            return "a secret token"
        has_upper = any(c.isupper() for c in run)
        has_lower = any(c.islower() for c in run)
        has_digit = any(c.isdigit() for c in run)
        if has_upper and has_lower and has_digit:
            return "a secret token"
    return None
