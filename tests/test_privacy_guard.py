"""The privacy guard's detections, the ordinary values it must let through, and its bounded,
linear work on hostile input."""

from __future__ import annotations

import socket
import time
from typing import Callable, Dict, Iterator
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaibantrace import EventError
from kaibantrace._encode import privacy as _privacy
from kaibantrace._encode.pipeline import MAX_PAYLOAD_BYTES, Reporter, clean_payload
from kaibantrace._encode.privacy import MAX_CHECKED_CHARS, personal_data_kind

MachineFactory = Callable[[str, str], None]


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Iterator[MachineFactory]:
    """Pretend to be a machine with the given login and host names (home in /home/<login>)."""

    def pretend(user: str, host: str) -> None:
        monkeypatch.setenv("HOME", f"/home/{user}")
        for variable in ("LOGNAME", "USER", "LNAME", "USERNAME"):
            monkeypatch.setenv(variable, user)
        monkeypatch.setattr(socket, "gethostname", lambda: host)
        _privacy.forget_local_markers()

    yield pretend
    monkeypatch.undo()
    _privacy.forget_local_markers()


@pytest.fixture
def alice(machine: MachineFactory) -> None:
    machine("alice", "devbox.example.org")


def clean(payload: Dict[str, str], strict: bool = False) -> Dict[str, str]:
    return clean_payload("evt", payload, Reporter(), strict)


# -- the detections --------------------------------------------------------------------------

class TestAccessKeyIds:
    @pytest.mark.parametrize("text", ["AKIAIOSFODNN7EXAMPLE", "ASIAY34FZKBOKMUTVV7A",
                                      "key AKIAIOSFODNN7EXAMPLE in use", "(AKIAIOSFODNN7EXAMPLE)"])
    def test_twenty_character_key_ids_are_refused(self, alice: None, text: str) -> None:
        """AKIA or ASIA and 16 upper-case letters or digits: an AWS access key ID."""
        assert personal_data_kind(text) == "an access key ID"

    def test_a_key_id_after_an_encoded_separator(self, alice: None) -> None:
        """The URL-decoded text is checked as written too: "%3D" is "=", not a letter before
        the key."""
        assert personal_data_kind("id%3DAKIAIOSFODNN7EXAMPLE%26x") is not None

    @pytest.mark.parametrize("text", ["AKIAIOSFODNN7EXAMPL", "AKIAIOSFODNN7EXAMPLEX",
                                      "akiaiosfodnn7example", "XAKIAIOSFODNN7EXAMPLE",
                                      "ASIA-PACIFIC", "AKIA"])
    def test_other_lengths_and_lower_case_pass(self, alice: None, text: str) -> None:
        """Exactly 20 characters, upper case, as a word of its own."""
        assert personal_data_kind(text) is None


class TestHexSecrets:
    MD5 = "d41d8cd98f00b204e9800998ecf8427e"
    SHA1 = "da39a3ee5e6b4b0d3255bfef95601890afd80709"
    SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

    @pytest.mark.parametrize("text", [
        MD5, SHA1, SHA256, MD5.upper(), "0123456789abcdef0123456789abcdef", "deadbeef" * 4,
        f"commit {SHA1}", f"md5:{MD5}", f"key_{MD5}", f"{SHA256}.json"])
    def test_runs_of_32_40_and_64_hex_digits_are_refused(self, alice: None, text: str) -> None:
        """The lengths of MD5, SHA-1 and SHA-256 hex digests (and of many keys), in either
        case, wherever they stand: the guard cannot tell a digest from a key."""
        assert personal_data_kind(text) == "a hex key or digest"

    @pytest.mark.parametrize("text", [
        MD5[:31], MD5 + "a", SHA1[:39], SHA1 + "a", SHA256[:63], SHA256 + "a", "a1b2c3d",
        "1" * 32, "9" * 40, MD5[:31] + "g"])
    def test_other_runs_pass(self, alice: None, text: str) -> None:
        """Other lengths (a short commit ID, a 33-digit run) and runs of decimal digits only
        are not refused by this rule."""
        assert personal_data_kind(text) is None


class TestUserAtHost:
    def test_login_at_a_host_without_a_dot(self, machine: MachineFactory) -> None:
        machine("bob", "devbox")
        assert personal_data_kind("bob@devbox") == "the user name"
        assert personal_data_kind("ssh bob@buildhost ls") == "the user name"
        assert personal_data_kind("deploy@devbox") == "the host name"

    def test_a_host_name_too_short_for_a_word_is_refused_after_an_at(
            self, machine: MachineFactory) -> None:
        """A two-letter host name is an ordinary word on its own, not in ``word@word``."""
        machine("root", "vm")
        assert personal_data_kind("root@vm") == "the host name"
        assert personal_data_kind("scp x ops@vm:/tmp") == "the host name"
        assert personal_data_kind("vm") is None
        assert personal_data_kind("vm-images") is None
        assert personal_data_kind("ops@vmware") is None
        assert personal_data_kind("@vm") is None

    def test_a_one_letter_login_is_refused_beside_an_at(self, machine: MachineFactory) -> None:
        machine("q", "devbox")
        assert personal_data_kind("q@build-7") == "the user name"
        assert personal_data_kind("q") is None
        assert personal_data_kind("faq@build-7") is None

    def test_other_names_and_shared_accounts_pass(self, machine: MachineFactory) -> None:
        """Only this machine's names are refused; a shared account is no one's name."""
        machine("root", "devbox")
        assert personal_data_kind("git@github") is None
        assert personal_data_kind("root@prod-db") is None
        assert personal_data_kind("root@devbox") == "the host name"


class TestCredentialPairs:
    @pytest.mark.parametrize("text", [
        "password=hunter2", "PASSWORD: hunter2", "passwd=x", "pwd = x", "secret=abc",
        "token=abc", "api_key=abc", "apikey=abc", "API-Key: abc", "access_key=abc",
        "accesskey=abc", "db_password=hunter2", "access_token=abc", "client_secret: abc",
        "https://api.example.com/v1/items?page=2&token=abc", '{"password":"hunter2"}',
        "token='abc'", "password%3Dhunter2", "retry with token: 42"])
    def test_secret_names_with_a_value_are_refused(self, alice: None, text: str) -> None:
        """A secret-ish name, as the whole name or its last part, then ``=`` or ``:`` and a
        value, in any case, plain, in a query string or in a mapping's JSON."""
        assert personal_data_kind(text) == "a password or token"

    @pytest.mark.parametrize("text", [
        "password=", "token: ", '{"token":""}', "token=&page=2", "tokens=12", "max_tokens=4096",
        "token_count=42", "num_tokens: 12", "secret_scanning: enabled", "password_reset",
        "token", "auth=token", "mytoken=abc", "tokenizer: tiktoken"])
    def test_empty_values_and_other_names_pass(self, alice: None, text: str) -> None:
        """The name must be the secret word itself, not a word containing it."""
        assert personal_data_kind(text) is None


    @pytest.mark.parametrize("key", ["password", "Password", "api_key", "apikey", "secret",
                                     "client_secret", "access_token", "token", "db.pwd"])
    def test_a_payload_field_named_for_a_credential_is_refused(self, alice: None,
                                                               key: str) -> None:
        """``{"password": "x"}`` is the pair ``password=x`` in a payload's form: dropped,
        whatever the value; with an empty value there is nothing to drop."""
        assert clean({key: "hunter2", "ok": "yes"}) == {"ok": "yes"}
        assert clean({key: ""}) == {key: ""}

    @pytest.mark.parametrize("key", ["tokens", "max_tokens", "token_count", "secret_scanning",
                                     "password_reset", "tokenizer"])
    def test_keys_that_only_contain_the_words_pass(self, alice: None, key: str) -> None:
        assert clean({key: "12"}) == {key: "12"}


DRESSINGS = st.sampled_from([str.lower, str.upper, str.title, str.swapcase])
SEPARATORS = st.sampled_from([" ", "=", ":", ",", "(", "'", '"', "\t", "\n", "; "])
AROUND = st.text(max_size=15)
# (the secret, whether changing its case keeps it one)
NEW_SECRETS = st.sampled_from([
    ("AKIAIOSFODNN7EXAMPLE", False), (TestHexSecrets.MD5, True), (TestHexSecrets.SHA1, True),
    (TestHexSecrets.SHA256, True), ("password=hunter2", True), ("api_key: k3y", True),
])


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(secret=NEW_SECRETS, case=DRESSINGS, encodings=st.integers(0, 2), before=AROUND,
       after=AROUND, left=SEPARATORS, right=SEPARATORS)
def test_new_secrets_are_caught_however_they_are_embedded(
        alice: None, secret: tuple[str, bool], case: Callable[[str], str], encodings: int,
        before: str, after: str, left: str, right: str) -> None:
    value, any_case = secret
    dressed = case(value) if any_case else value
    for _ in range(encodings):
        dressed = quote(dressed, safe="")
    text = before + left + dressed + right + after
    assert personal_data_kind(text) is not None, text


# -- what must pass --------------------------------------------------------------------------

ORDINARY = [
    # versions
    "1.2.3", "v2.0.0-rc.1", "3.11.4", "python 3.11.7", "2024.10.1", "0.1.0.dev3", "1.0.0+build.5",
    # counts and numbers
    "0", "3", "42", "-1", "1000000", "3.14", "1e-06", "12345678901234567890",
    # command, event and feature names
    "db migrate", "run_board", "workflow_started", "task.completed", "agent:planner", "--dry-run",
    # model names
    "gpt-4o-mini", "gpt-4.1", "claude-3-5-sonnet-20241022", "llama-3.1-70b-instruct",
    "mistral-large-latest", "text-embedding-3-small", "gemini-1.5-pro-002", "o1-preview",
    "anthropic/claude-3-5-sonnet-20241022",
    # dates, times and durations
    "2026-12-03", "2026-12-03T16:17:11Z", "2026-12-03T16:17:11.123+01:00", "12:30:45",
    "00:01:30", "1.5s", "250ms", "PT1H30M", "3 days",
    # file extensions, languages, booleans, operating systems
    ".py", "tar.gz", "json", "en", "en-US", "pt_BR", "zh-Hans", "true", "False", "yes", "null",
    "linux", "macos", "Windows 11", "Darwin", "ubuntu 24.04", "x86_64", "arm64",
    # pairs of ordinary names and values
    "token_count=42", "max_tokens=4096", "tokens=12", "temperature=0.7", "retries: 3",
    "status=ok", "auth_method=token", "secret_scanning=off",
    # short hex and other identifiers
    "a1b2c3d", "build 7f3e2a1", "#ff8800", "0x1f", "sha256", "md5",
    # words of other people and places
    "git@github", "localhost:8080", "https://example.com/docs/getting-started",
]


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_values_pass(alice: None, text: str) -> None:
    """Versions, counts, command and model names, dates, durations, extensions, languages,
    booleans and OS names are not personal data (nor are they, as keys)."""
    assert personal_data_kind(text) is None


def test_ordinary_values_are_sent(alice: None) -> None:
    """The same values, as a payload, all reach the signal."""
    payload = {f"k{i}": text for i, text in enumerate(ORDINARY)}
    assert clean(payload) == payload


# -- the bound -------------------------------------------------------------------------------

class TestBound:
    def test_every_sendable_text_is_checked_whole(self) -> None:
        """No text longer than the bound can fit in a payload (each character is a byte or
        more), so a text short enough to be sent is checked to its end."""
        assert MAX_CHECKED_CHARS >= MAX_PAYLOAD_BYTES

    def test_personal_data_at_the_end_of_the_longest_checked_text(self, alice: None) -> None:
        tail = " mail carol@example.com"
        text = "y" * (MAX_CHECKED_CHARS - len(tail)) + tail
        assert len(text) == MAX_CHECKED_CHARS
        assert personal_data_kind(text) == "an e-mail address"

    def test_personal_data_past_the_bound_is_never_sent(self, alice: None) -> None:
        """Beyond the bound the text is not read; its payload is refused for its size."""
        text = "y" * MAX_CHECKED_CHARS + " mail carol@example.com"
        assert clean({"log": text, "n": "1"}) == {}
        assert clean({text: "1", "n": "1"}) == {}
        with pytest.raises(EventError, match="over 4096 bytes"):
            clean({"log": text}, strict=True)

    def test_personal_data_within_the_bound_of_a_long_text_is_reported(self, alice: None) -> None:
        assert personal_data_kind("mail carol@example.com " + "y" * 100_000) == "an e-mail address"


# -- linear time -----------------------------------------------------------------------------

# Hostile inputs of 64 KiB for each pattern: long runs that a backtracking pattern could
# rescan from every position.
PATHOLOGICAL: Dict[str, Callable[[int], str]] = {
    "hex run, then an e-mail-like word": lambda n: "deadbeef" * (n // 8) + " git@github",
    "word characters, then @": lambda n: "a" * n + "@x",
    "@ after every character": lambda n: "a@" * (n // 2),
    "@, then a label without a dot": lambda n: "a@" + "a" * n,
    "colons": lambda n: ":" * n,
    "hex digits and colons": lambda n: "a:" * (n // 2),
    "IPv6-like groups": lambda n: "1:1::" * (n // 5),
    "IPv6 zone": lambda n: "::%" + "a" * n,
    "token run": lambda n: "Aa1" * (n // 3),
    "runs one short of a token": lambda n: "abcdefghijklmnopqrstuvw " * (n // 24),
    "percent signs": lambda n: "%" * n,
    "encoded percent signs": lambda n: "%25" * (n // 3),
    "encoded letters": lambda n: "%41" * (n // 3),
    "zeros": lambda n: "0" * n,
    "hex runs one too long": lambda n: ("a" * 33 + " ") * (n // 34),
    "spaces after a secret name": lambda n: "token" + " " * n + "=",
    "parts of a long name": lambda n: "a_" * (n // 2) + "=",
    "secret names": lambda n: "token=" * (n // 6),
    "dots and digits": lambda n: "1." * (n // 2),
    "almost IPv4": lambda n: "255.255.255.2555" * (n // 16),
    "almost MAC": lambda n: "00:" * (n // 3),
    "backslashes": lambda n: "\\" * n,
    "almost the user name": lambda n: "alic" * (n // 4),
    "almost an access key ID": lambda n: "AKIA" * (n // 4),
    "dots, then @": lambda n: "." * n + "@",
}
BIG = 64 * 1024
GENEROUS = 1.0  # seconds; the quadratic e-mail pattern took 3 to 5 s on 64 KiB


@pytest.fixture
def short_names(machine: MachineFactory) -> None:
    """A login name checked as a word, a host name checked only beside an @."""
    machine("alice", "vm")


def seconds(check: Callable[[str], object], text: str) -> float:
    """The CPU time of this thread for the fastest of three runs: what the work costs.
    The clock on the wall would count the time other processes had the CPU, and on a
    busy machine that stretches a run of 10 ms far more than one of 1 ms, which fits in
    a single turn: 8x the text then "took" 25x as long."""
    best = float("inf")
    for _ in range(3):
        start = time.thread_time()
        check(text)
        best = min(best, time.thread_time() - start)
    return best


@pytest.mark.parametrize("make", PATHOLOGICAL.values(), ids=PATHOLOGICAL.keys())
def test_the_guard_is_quick_on_hostile_input(short_names: None, make: Callable[[int], str]
                                             ) -> None:
    """64 KiB of hostile text takes far less than a second: the guard reads at most the
    bound, and every check on it is linear."""
    start = time.perf_counter()
    personal_data_kind(make(BIG))
    assert time.perf_counter() - start < GENEROUS


@pytest.mark.parametrize("make", PATHOLOGICAL.values(), ids=PATHOLOGICAL.keys())
def test_every_check_is_linear(short_names: None, make: Callable[[int], str]) -> None:
    """Past the bound too: all the checks on 64 KiB take well under a second, and eight
    times the text takes about eight times as long, not sixty-four (a quadratic pattern).
    A shared machine can slow one measurement down, so the line between the two is drawn
    far from both (22, their geometric middle), and a ratio over it is measured again
    before it fails."""
    small, big = make(BIG // 8), make(BIG)
    assert seconds(_privacy._check, big) < GENEROUS
    ratios = []
    for _ in range(3):
        took_small, took_big = seconds(_privacy._check, small), seconds(_privacy._check, big)
        if took_big < 0.005 or took_big < 22 * took_small:  # a few ms is no hang at any rate
            return
        ratios.append(round(took_big / took_small, 1))
    pytest.fail(f"8x the text took {ratios} times as long")
