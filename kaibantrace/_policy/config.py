"""Settings, environment variables, and the one function that decides opt-out.

Precedence, in one sentence: an opt-out from any source (code, the client's
opt-out variable, ``DO_NOT_TRACK``, the user's saved ``kaibantrace disable``, an
endpoint that retired itself) wins over everything; otherwise an argument
given in code beats an environment variable, which beats the default.

Code-level values are validated here and raise ``ConfigurationError`` naming the
setting, because the author can fix them. Environment values belong to end
users: a bad one is logged once and treated in the safest way (an unusable
endpoint means nothing is sent), never raised into their program.

This module reads the environment only when asked; it starts nothing.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Optional, Tuple, TypedDict

from .._errors import ConfigurationError
from .._log import logger
from .endpoint import endpoint_problem
from .page import page_opt_out

if TYPE_CHECKING:
    from .._delivery.transport import Transport

ENV_OPT_OUT = "KAIBAN_TELEMETRY_OPT_OUT"
ENV_DO_NOT_TRACK = "DO_NOT_TRACK"
ENV_DEBUG = "KAIBAN_TELEMETRY_DEBUG"
ENV_ENDPOINT = "KAIBAN_TELEMETRY_ENDPOINT"
ENV_APP_ID = "KAIBAN_TELEMETRY_APP_ID"
ENV_PROFILE = "KAIBAN_TELEMETRY_PROFILE"
ENV_DETACHED = "KAIBAN_TELEMETRY_DETACHED"

DEFAULT_ENDPOINT = "https://nom.telemetrydeck.com/v2/"

# Values that leave a flag unset. Anything else sets it, so an unknown value
# such as "yes please" or "2" fails closed (opted out) rather than open.
_HEX = frozenset("0123456789abcdefABCDEF")
_UNSET_WORDS = frozenset({"", "0", "false", "no", "off", "n", "f"})
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")  # a command a user types, as printed


def flag_is_set(raw: Optional[str]) -> bool:
    """Whether an environment flag such as ``DO_NOT_TRACK`` is switched on."""
    return raw is not None and raw.strip().lower() not in _UNSET_WORDS


class Settings(NamedTuple):
    """Everything a client is configured with in code; ``None`` means "not given".

    A named tuple rather than a dataclass: as immutable, and cheaper to import.
    """

    app_id: Optional[str] = None
    endpoint: Optional[str] = None
    namespace: Optional[str] = None
    salt: str = ""
    test_mode: bool = False
    opt_out: bool = False
    opt_out_env: str = ENV_OPT_OUT
    debug: Optional[bool] = None
    strict: bool = False
    batch_size: int = 100
    flush_interval: float = 0.5
    max_queue: int = 10_000
    timeout: float = 3.0
    exit_timeout: float = 0.1
    backoff: float = 1.0
    profile: Optional[str] = None
    default_parameters: bool = False
    local_secret: Optional[bool] = None
    detached_delivery: bool = True
    max_per_minute: int = 60
    default_payload: Optional[Mapping[str, str]] = None
    tool_name: Optional[str] = None

    def replace(self, **changes: object) -> Settings:
        """A copy with ``changes`` applied, skipping ``None`` values, validated."""
        given = {key: value for key, value in changes.items() if value is not None}
        unknown = set(given) - set(self._fields)
        if unknown:
            raise TypeError(f"unknown kaibantrace setting(s): {', '.join(sorted(unknown))}")
        return validate(self._replace(**given))  # type: ignore[arg-type]


class Options(TypedDict, total=False):
    """The keyword arguments of ``configure()``: every setting, plus ``transport``.

    One list for type checkers (``**settings: Unpack[Options]``), so a typo such
    as ``configure(batch_sise=10)`` is an error in the editor, while at run time
    ``Settings.replace`` still refuses an unknown name. ``None`` leaves a
    setting as it is. Kept equal to ``Settings``'s fields by a test.
    """

    app_id: Optional[str]
    endpoint: Optional[str]
    namespace: Optional[str]
    salt: Optional[str]
    test_mode: Optional[bool]
    opt_out: Optional[bool]
    opt_out_env: Optional[str]
    debug: Optional[bool]
    strict: Optional[bool]
    batch_size: Optional[int]
    flush_interval: Optional[float]
    max_queue: Optional[int]
    timeout: Optional[float]
    exit_timeout: Optional[float]
    backoff: Optional[float]
    profile: Optional[str]
    default_parameters: Optional[bool]
    local_secret: Optional[bool]
    detached_delivery: Optional[bool]
    max_per_minute: Optional[int]
    default_payload: Optional[Mapping[str, Any]]
    tool_name: Optional[str]
    transport: Optional[Transport]


def validate(settings: Settings) -> Settings:
    """Check code-given settings, raising ``ConfigurationError`` that names the setting."""
    s = settings
    if s.app_id is not None:
        app_id = canonical_app_id(s.app_id)
        _expect(app_id is not None, "app_id must be a TelemetryDeck app ID: a UUID, written "
                "like '00000000-0000-4000-8000-000000000000', from your TelemetryDeck app")
        s = s._replace(app_id=app_id)
    if s.endpoint is not None:
        problem = endpoint_problem(s.endpoint)
        _expect(problem is None, f"endpoint {problem}")
    _expect(s.namespace is None or (isinstance(s.namespace, str)
                                    and _NAMESPACE.match(s.namespace) is not None),
            "namespace must be 1-128 characters of letters, digits, '_', '.' or '-'")
    _expect(isinstance(s.salt, str), "salt must be a string")
    _expect(s.profile is None or s.profile in PROFILES,
            f"profile must be one of {', '.join(repr(p) for p in PROFILES)}")
    _expect(s.local_secret is None or isinstance(s.local_secret, bool),
            "local_secret must be True, False or None")
    for name in ("test_mode", "opt_out", "strict", "default_parameters", "detached_delivery"):
        _expect(isinstance(getattr(s, name), bool), f"{name} must be True or False")
    _expect(s.debug is None or isinstance(s.debug, bool), "debug must be True, False or None")
    _expect(isinstance(s.opt_out_env, str) and _ENV_NAME.match(s.opt_out_env) is not None,
            "opt_out_env must be an environment variable name")
    _expect(_is_int(s.batch_size) and 1 <= s.batch_size <= 100,
            "batch_size must be an integer from 1 to 100 (TelemetryDeck's limit per request)")
    _expect(_is_int(s.max_queue) and s.max_queue >= 1, "max_queue must be a positive integer")
    _expect(_is_int(s.max_per_minute) and s.max_per_minute >= 0,
            "max_per_minute must be a whole number of signals per event name per minute, "
            "or 0 for no limit")
    for name in ("flush_interval", "timeout", "exit_timeout", "backoff"):
        value = getattr(s, name)
        _expect(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 60,
                f"{name} must be a number of seconds above 0 and at most 60")
    _expect(s.tool_name is None or (isinstance(s.tool_name, str)
                                    and _TOOL_NAME.fullmatch(s.tool_name) is not None),
            "tool_name must be the command users type, 1-64 letters, digits, '.', '_', '+' "
            "or '-', such as 'mytool'")
    # default_payload is checked by the encoder, where the client is made or configured
    # (``_encode.payload.checked_default_payload``): this layer cannot clean a payload.
    return s


def is_app_id(value: object) -> bool:
    """Whether ``value`` has the form of a TelemetryDeck app ID (a UUID)."""
    return canonical_app_id(value) is not None


def canonical_app_id(value: object) -> Optional[str]:
    """``value`` as the one spelling of its app ID, or ``None`` when it is not a UUID.

    The spelling is TelemetryDeck's own: upper-case hex, hyphenated 8-4-4-4-12,
    as its Swift SDK writes the UUID it parses and its dashboard shows it (and
    as KaibanJS's IDs are written). Every path that takes an app ID passes it
    through here, so ``{15e9347e-...}``, ``urn:uuid:15e9347e-...`` and
    ``15E9347E-...`` name one app: one outbox, one ``status``, one signal
    ``appID`` that the ingest accepts whichever way the author wrote it.
    """
    if not isinstance(value, str):
        return None
    # The forms ``uuid.UUID`` reads (braces, ``urn:uuid:``, hyphens anywhere), checked
    # by hand: importing ``uuid`` costs more than a whole decision.
    digits = value.replace("urn:", "").replace("uuid:", "").strip("{}").replace("-", "")
    if len(digits) != 32 or not all(c in _HEX for c in digits):
        return None
    d = digits.upper()
    return f"{d[:8]}-{d[8:12]}-{d[12:16]}-{d[16:20]}-{d[20:]}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigurationError(f"kaibantrace: {message}")


PROFILES = ("default", "kaibanjs")
KAIBANJS_LIBRARY_APP_ID = "15E9347E-9EE5-4971-A8FB-61D91F3EBA12"  # as in kaibantrace.events
KAIBANJS_CLI_APP_ID = "95BF7A3E-9D86-432D-9633-3526DD3A8977"


def companion_apps(app_id: str) -> Tuple[str, ...]:
    """The app IDs whose signals may wait in ``app_id``'s outbox, lowercase: its own, and
    for KaibanJS's library app also its CLI app, as a client lent both sends to both."""
    own = app_id.lower()
    if own == KAIBANJS_LIBRARY_APP_ID.lower():
        return own, KAIBANJS_CLI_APP_ID.lower()
    return (own,)

SAVED_PREFERENCE = "saved preference"
RETIRED_ENDPOINT = "retired endpoint"


class Decision(NamedTuple):
    """Whether a client sends, which source decided it, and what it sends as."""

    enabled: bool
    decided_by: str
    debug: bool
    app_id: Optional[str]
    profile: str = "default"
    cli_app_id: Optional[str] = None  # where CLI events go instead, when not ``app_id``


def profile_of(settings: Settings, environ: Mapping[str, str]) -> str:
    """The profile in force: code, then ``KAIBAN_TELEMETRY_PROFILE``, then ``"default"``."""
    if settings.profile is not None:
        return settings.profile
    chosen = (environ.get(ENV_PROFILE) or "").strip().lower()
    if chosen and chosen not in PROFILES:
        _log_bad_env_once(ENV_PROFILE, f"is not one of {', '.join(PROFILES)}", sends=True)
        return "default"
    return chosen or "default"


def keyed_with_local_secret(settings: Settings) -> bool:
    """Whether CLI identities are keyed with the machine's secret before hashing.

    On unless the author turned it off or chose the KaibanJS profile in code
    (KaibanJS's identities). ``KAIBAN_TELEMETRY_PROFILE`` alone never lowers
    this protection.
    """
    if settings.local_secret is not None:
        return settings.local_secret
    return settings.profile != "kaibanjs"


def decide(settings: Settings, environ: Mapping[str, str]) -> Decision:
    """The one place that decides opt-out, debug mode, the app ID and the profile.

    ``decided_by`` names the source: ``"code"``, the opt-out variable's name,
    ``"DO_NOT_TRACK"``, in a browser page (Pyodide) the page's variable or the
    browser's privacy signal (``_policy.page``), ``"saved preference"`` (``kaibantrace
    disable``), ``"retired endpoint"`` (it answered 410 Gone) or ``"default"``.
    """
    from . import prefs as _prefs  # here, not at the top: ``decide`` alone needs it

    profile = profile_of(settings, environ)
    if settings.opt_out:
        return Decision(False, "code", False, None, profile)
    # The client's own variable, then the two that switch off every program using
    # kaibantrace, whatever variable of its own a library chose.
    for name in dict.fromkeys((settings.opt_out_env, ENV_OPT_OUT, ENV_DO_NOT_TRACK)):
        raw = environ.get(name)
        # KaibanJS opts out on any non-empty value of its variable; its profile does too.
        kaibanjs_style = profile == "kaibanjs" and name == settings.opt_out_env and bool(raw)
        if kaibanjs_style or flag_is_set(raw):
            return Decision(False, name, False, None, profile)
    page = page_opt_out()  # under Pyodide: the page's variable, Do Not Track, GPC
    if page is not None:
        return Decision(False, page, False, None, profile)
    if _prefs.saved_choice() == _prefs.DISABLED:
        return Decision(False, SAVED_PREFERENCE, False, None, profile)
    debug = settings.debug if settings.debug is not None else flag_is_set(environ.get(ENV_DEBUG))
    configured = _configured_app_id(settings, environ)
    app_id = configured or _lent_app_id(settings)
    if app_id is not None and not debug:
        url = ingest_url(settings, environ)
        if url is not None and _prefs.is_retired(app_id, url):
            return Decision(False, RETIRED_ENDPOINT, False, None, profile)
    # KaibanJS's own split, only where its app IDs were lent: its CLI reports to one app,
    # its library to another.
    lent = configured is None and app_id is not None
    return Decision(True, "default", debug, app_id, profile, KAIBANJS_CLI_APP_ID if lent else None)


def _configured_app_id(settings: Settings, environ: Mapping[str, str]) -> Optional[str]:
    app_id = settings.app_id
    if app_id is None:
        raw = (environ.get(ENV_APP_ID) or "").strip()
        app_id = canonical_app_id(raw) if raw else None
        if raw and app_id is None:
            _log_bad_env_once(ENV_APP_ID, "is not a UUID")
    return app_id


def app_id_of(settings: Settings, environ: Mapping[str, str]) -> Optional[str]:
    """The app a client's signals are for, canonical, whether or not it is opted out.

    Code (validated, so canonical already), else ``KAIBAN_TELEMETRY_APP_ID``
    (a value that is not a UUID is logged once and ignored), else KaibanJS's
    library app when the KaibanJS profile was chosen in code.
    """
    return _configured_app_id(settings, environ) or _lent_app_id(settings)


def _lent_app_id(settings: Settings) -> Optional[str]:
    # Only a profile chosen in code lends KaibanJS's app ID: an environment
    # variable must not route another program's signals to KaibanJS.
    return KAIBANJS_LIBRARY_APP_ID if settings.profile == "kaibanjs" else None


_CI_FLAGS = ("TF_BUILD", "GITHUB_ACTIONS", "APPVEYOR", "CI", "TRAVIS", "CIRCLECI")
_CI_PRESENT = (("CODEBUILD_BUILD_ID", "AWS_REGION"), ("BUILD_ID", "BUILD_URL"),
               ("BUILD_ID", "PROJECT_ID"), ("TEAMCITY_VERSION",), ("JB_SPACE_API_URL",))


def in_ci(environ: Mapping[str, str]) -> bool:
    """Whether this looks like a CI run (the variables .NET's SDK checks)."""
    if any(flag_is_set(environ.get(name)) for name in _CI_FLAGS):
        return True
    return any(all(environ.get(name) for name in names) for names in _CI_PRESENT)


def ingest_url(settings: Settings, environ: Mapping[str, str]) -> Optional[str]:
    """The URL signals are posted to, or ``None`` when the configured one is unusable."""
    base = settings.endpoint
    if base is None:
        from_env = (environ.get(ENV_ENDPOINT) or "").strip()
        if from_env:
            problem = endpoint_problem(from_env)
            if problem is not None:
                _log_bad_env_once(ENV_ENDPOINT, problem)
                return None
            base = from_env
        else:
            base = DEFAULT_ENDPOINT
    if not base.endswith("/"):
        base += "/"
    if settings.namespace:
        from urllib.parse import quote

        base += f"namespace/{quote(settings.namespace, safe='')}/"
    return base


def why_nothing_is_sent(settings: Settings, decision: Decision, environ: Mapping[str, str],
                        *, any_app: bool = False) -> Optional[str]:
    """Why no signal of this client can leave the machine now, in words for its user, or
    ``None`` when signals can be sent. What ``kaibantrace status`` says, so that "on" is
    never shown for a client that drops every event. ``any_app``: asked for every program
    on the machine (the ``kaibantrace`` command), whose app IDs are their own business."""
    if not decision.enabled:
        return "telemetry is off"
    if decision.debug:
        return "in debug mode signals are printed on stderr, never sent"
    if decision.app_id is None and not any_app:
        return f"no app ID is configured (app_id in the program's code, or {ENV_APP_ID})"
    if ingest_url(settings, environ) is None:
        return unusable_endpoint(environ)
    return None


def unusable_endpoint(environ: Mapping[str, str]) -> str:
    """Why the endpoint from the environment cannot be used (the only way to have none:
    one given in code is checked when configured)."""
    value = (environ.get(ENV_ENDPOINT) or "").strip()
    return f"{ENV_ENDPOINT}={value} is unusable: it {endpoint_problem(value)}"


_reported_env: set[str] = set()


def _log_bad_env_once(name: str, problem: str, *, sends: bool = False) -> None:
    if name not in _reported_env:
        _reported_env.add(name)
        outcome = "using the default" if sends else "nothing will be sent"
        logger.warning("kaibantrace: ignoring %s: it %s; %s", name, problem, outcome)
