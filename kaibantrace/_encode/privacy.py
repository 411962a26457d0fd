"""The privacy guard: refuse payload text that looks like personal data or a secret.

A text (a payload key, a payload value, an event name) is refused when it
contains any of these:

* an e-mail address: ``local@domain.tld``;
* an IPv4 address (each part at most 255), an IPv6 address, or a MAC address
  (six hex pairs joined by ``:`` or ``-``);
* this machine's home directory, so any absolute path under it;
* this machine's login name or host name (its first label) as a word of its
  own, i.e. not inside a longer word of letters, digits and ``_``. A name too
  short to be refused on its own (a login name of one character, a host name
  of one or two such as ``vm``) is refused only as either side of an ``@``
  (``ops@vm``). Shared service accounts (``root``, ``runner``, ``ubuntu`` and
  the like) and ``localhost`` name no person and are never refused as names;
* a token-like secret: a run of 24 or more characters of ``A-Z a-z 0-9 _ + / = -``
  that mixes upper case, lower case and digits, or that starts with a known
  prefix (``sk-``, ``ghp_``, ``xoxb-``, ``glpat-``, ``eyJ`` ...);
* an AWS access key ID: ``AKIA`` or ``ASIA`` and 16 upper-case letters or
  digits, 20 characters in all;
* a run of exactly 32, 40 or 64 hexadecimal digits not joined to other
  letters or digits (the length of an MD5, SHA-1 or SHA-256 hex digest, and of
  many API keys), in either case, unless all of them are decimal digits. So a 32-character hex value such as
  ``0123456789abcdef0123456789abcdef`` is refused, whatever it means: the
  guard cannot tell a harmless digest from a key. (kaibantrace's own hashed
  fields, ``clientUser`` among them, are made after the guard and never
  pass through it.) Runs of other lengths, such as a short commit ID, pass;
* a credential pair: ``password``, ``passwd``, ``pwd``, ``secret``, ``token``,
  ``api_key``/``apikey``/``api-key`` or ``access_key``/``accesskey``/
  ``access-key``, in any case, possibly quoted and possibly the last part of a
  longer name joined by ``_``, ``-`` or ``.`` (``access_token``,
  ``client_secret``), followed by ``=`` or ``:`` and a non-empty value: in
  text, in a URL's query string, in the JSON of a mapping value. A name that
  only contains one of these words passes: ``tokens=12``, ``max_tokens=4096``,
  ``token_count=42``, ``secret_scanning: on``; so does an empty value
  (``password=``). A payload field is such a pair too: a key so named with a
  non-empty value (``{"password": "x"}``, ``{"api_key": ...}``) is refused
  (``credential_key``), whatever the value, so ``{"token": "expired"}`` is as well.

Each text is checked as written, URL-decoded (twice), lower-cased, and with
``/`` for ``\\``, so simple disguises do not get through.

What passes: everything else, in particular versions (``v2.0.0-rc.1``),
counts, times and ISO dates, durations, command and feature names, model names
(``gpt-4o-mini``), language codes, OS names and words such as ``true``.
``tests/test_privacy_guard.py`` keeps a list of such values that must pass.
Harmless values the rules above do refuse: a version of four dotted parts of at
most 255 (``1.2.3.4``, an IPv4 address), any 32-, 40- or 64-digit hex run (a
commit ID in full), and a name of 24 or more characters without dots that mixes
cases and digits (``mistralai/Mixtral-8x7B-Instruct-v0.1``, a token run).

Bounded work: every check runs in time linear in the text, and only the first
``MAX_CHECKED_CHARS`` characters of a text are checked at all. A longer text
can never be sent: the pipeline refuses any payload over 4096 bytes encoded,
every character takes at least one byte, and an event name has at most 128
characters. So the unchecked tail of such a text is never sent; the checked
start still lets personal data there be reported as such rather than only as
an oversized payload.

The guard only answers "refuse, and why". Dropping the field and logging a
warning that names the key (never the value) is the pipeline's job
(``payload.clean_payload``, and ``pipeline`` for event names).

What it does not do: prove that text is anonymous. It catches the mistakes an
author is likely to make; it is not a substitute for sending coarse values.
"""

from __future__ import annotations

import os
import re
from typing import Dict, Optional, Tuple

from .._fork import guard as fork_guard

# Characters of a text that are checked; at least payload.py's MAX_PAYLOAD_BYTES (a
# text longer than that cannot be sent), which cannot be imported here (it imports us).
MAX_CHECKED_CHARS = 4096

# Python's regular expressions backtrack, so each pattern below is written so that no
# start position can make it scan far: each begins at a fixed character or behind a
# look-behind that only the first character of a run passes, and repeats are bounded
# or end where the next part cannot begin.

# An "@" with a local-part character before it and "label.label" after it. Anchoring
# on the "@" matters: "[chars]+@" searched from every position of a long run of
# those characters rescans the run each time (quadratic time).
_EMAIL = re.compile(r"(?<=[a-z0-9._%+-])@[a-z0-9-]+\.[a-z0-9-]")
_IPV4 = re.compile(r"(?<![\d.])(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?![\d])")
_IPV6_CANDIDATE = re.compile(r"[0-9a-f]{0,4}(?::[0-9a-f]{0,4}){2,7}(?:%[0-9a-z]+)?")
_MAC = re.compile(r"(?<![0-9a-f])[0-9a-f]{2}([:-])(?:[0-9a-f]{2}\1){4}[0-9a-f]{2}(?![0-9a-f])")
_TOKEN_CHARS = "A-Za-z0-9_+/=-"
_TOKEN_RUN = re.compile(rf"(?<![{_TOKEN_CHARS}])[{_TOKEN_CHARS}]{{24,}}")
_SECRET_PREFIXES = ("sk-", "sk_live_", "pk_live_", "ghp_", "gho_", "ghs_", "github_pat_",
                    "xoxb-", "xoxp-", "akia", "eyj", "glpat-", "hf_")
_AWS_KEY_ID = re.compile(r"(?<![A-Za-z0-9])A[KS]IA[A-Z0-9]{16}(?![A-Za-z0-9])")
# Hex runs of 32 to 64 digits; only the lengths in _HEX_LENGTHS are refused.
_HEX_RUN = re.compile(r"(?<![0-9a-z])[0-9a-f]{32,64}(?![0-9a-z])")
_HEX_LENGTHS = frozenset({32, 40, 64})
_CREDENTIAL_KEY = re.compile(
    r"(?:^|[_.-])(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key)$",
    re.IGNORECASE)
_CREDENTIAL = re.compile(
    r"(?<![a-z0-9])(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key)"
    r"[\"']?[ \t]{0,4}[=:][ \t]{0,4}[\"']?[^\s\"'&;,)}\]]")

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
_words: Tuple[Tuple[str, re.Pattern[str]], ...] = ()  # (kind, the user or host name's pattern)

# Verdicts on short texts, which repeat a lot (keys, enum-like values): at most
# this many are kept, and all are forgotten when the machine's markers are.
_CACHE_SIZE = 4096
_CACHEABLE_LENGTH = 256
_verdicts: Dict[str, Optional[str]] = {}
_UNKNOWN = object()


def _name_pattern(name: str, shortest_word: int) -> re.Pattern[str]:
    """``name`` as a word of its own, or, when shorter than ``shortest_word`` (too
    likely to be an ordinary word), only as either side of ``word@word``."""
    escaped = re.escape(name)
    if len(name) >= shortest_word:
        return re.compile(rf"(?<![a-z0-9_]){escaped}(?![a-z0-9_])")
    return re.compile(rf"(?<![a-z0-9_.-]){escaped}@[a-z0-9_-]|[a-z0-9_.-]@{escaped}(?![a-z0-9_-])")


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
        _user = name if name and name not in _GENERIC_ACCOUNTS else None
        _host = host if host and host not in ("localhost", "localhost6") else None
        _words = tuple((kind, _name_pattern(word, shortest))
                       for kind, word, shortest in (("the user name", _user, 2),
                                                    ("the host name", _host, 3))
                       if word is not None)
        _user_known = True
    return _user


def forget_local_markers() -> None:
    """Look the home directory and user name up again at the next check (tests)."""
    global _local, _user, _user_known, _host, _words
    _local, _user, _user_known, _host, _words = None, None, False, None, ()
    _verdicts.clear()


def personal_data_kind(text: str) -> Optional[str]:
    """What kind of personal data or secret ``text`` seems to hold, or ``None``.

    Only the first ``MAX_CHECKED_CHARS`` characters are checked (see the module's
    docstring: a longer text cannot be sent)."""
    if not text:
        return None
    text = text[:MAX_CHECKED_CHARS]
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
    """The verdict on all of ``text``, in time linear in its length."""
    originals: Tuple[str, ...] = (text,)
    if "%" in text:
        from urllib.parse import unquote  # linear: it splits the text at each "%"

        decoded = unquote(unquote(text))
        if decoded != text:
            originals = (text, decoded)
    for variant in _variants(originals):
        kind = _kind(variant)
        if kind is not None:
            return kind
    for original in originals:
        kind = _secret_kind(original)
        if kind is not None:
            return kind
    return None


def _variants(originals: Tuple[str, ...]) -> Tuple[str, ...]:
    """The texts lower-cased (decoded first, so that "%41" is "a" too), and the last
    of them with ``/`` for ``\\``, each once."""
    lowered = tuple(dict.fromkeys(original.lower() for original in originals))
    slashed = lowered[-1].replace("\\", "/")
    return lowered if slashed == lowered[-1] else (*lowered, slashed)


def _kind(text: str) -> Optional[str]:
    """Checks on lower-cased text."""
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
    if ("=" in text or ":" in text) and _CREDENTIAL.search(text):
        return "a password or token"
    for match in _HEX_RUN.finditer(text):
        run = match.group(0)
        if len(run) in _HEX_LENGTHS and not run.isdigit():
            return "a hex key or digest"
    return None


def _trimmed(candidate: str) -> Tuple[str, ...]:
    """The candidate, then without colons of the text around it ("addr: 2001:db8::1::"):
    the address may end where the surrounding punctuation begins."""
    return tuple(dict.fromkeys((candidate, candidate.rstrip(":"), candidate.lstrip(":"),
                                candidate.strip(":"))))


def _secret_kind(text: str) -> Optional[str]:
    """Checks on text as written, where case tells a token from a word."""
    for match in _TOKEN_RUN.finditer(text):
        run = match.group(0)
        if run.lower().startswith(_SECRET_PREFIXES):
            return "a secret token"
        has_upper = any(c.isupper() for c in run)
        has_lower = any(c.islower() for c in run)
        has_digit = any(c.isdigit() for c in run)
        if has_upper and has_lower and has_digit:
            return "a secret token"
    if "IA" in text and _AWS_KEY_ID.search(text):
        return "an access key ID"
    return None


def credential_key(key: str) -> Optional[str]:
    """``"a password or token"`` when a payload key names a credential (``password``,
    ``api_key``, ``client_secret``...), the structured form of ``password=...``."""
    return "a password or token" if _CREDENTIAL_KEY.search(key[:MAX_CHECKED_CHARS]) else None
