"""Settings validation, environment parsing and the opt-out decision."""

from __future__ import annotations

import pytest

from kaibantrace import ConfigurationError, Settings
from kaibantrace._policy.config import decide, flag_is_set, ingest_url
from kaibantrace._policy.endpoint import endpoint_problem


class TestFlagParsing:
    @pytest.mark.parametrize("raw", [None, "", "0", "false", "FALSE", " no ", "off", "n", "F"])
    def test_unset_words_leave_the_flag_off(self, raw: str | None) -> None:
        """Empty and the documented false words (any case, trimmed) leave a flag off."""
        assert flag_is_set(raw) is False

    @pytest.mark.parametrize("raw", ["1", "true", "True", "yes", "on", "2", "anything", " x "])
    def test_any_other_value_sets_the_flag(self, raw: str) -> None:
        """Every other value sets the flag, so an unknown value fails closed."""
        assert flag_is_set(raw) is True


class TestDecide:
    def test_default_is_enabled(self) -> None:
        """With nothing set, telemetry is on and the default decided."""
        decision = decide(Settings(), {})
        assert (decision.enabled, decision.decided_by) == (True, "default")

    def test_code_opt_out_wins_over_everything(self) -> None:
        """An opt-out given in code wins even when the environment says 0."""
        decision = decide(Settings(opt_out=True), {"KAIBAN_TELEMETRY_OPT_OUT": "0"})
        assert (decision.enabled, decision.decided_by) == (False, "code")

    def test_opt_out_variable(self) -> None:
        """The client's opt-out variable turns it off and is named as the source."""
        decision = decide(Settings(), {"KAIBAN_TELEMETRY_OPT_OUT": "true"})
        assert (decision.enabled, decision.decided_by) == (False, "KAIBAN_TELEMETRY_OPT_OUT")

    def test_do_not_track(self) -> None:
        """DO_NOT_TRACK turns every client off."""
        decision = decide(Settings(opt_out_env="MYLIB_NO_TELEMETRY"), {"DO_NOT_TRACK": "1"})
        assert (decision.enabled, decision.decided_by) == (False, "DO_NOT_TRACK")

    def test_custom_opt_out_variable_is_independent(self) -> None:
        """A client with its own variable ignores another library's variable..."""
        decision = decide(Settings(opt_out_env="MYLIB_NO_TELEMETRY"),
                          {"OTHERLIB_NO_TELEMETRY": "1"})
        assert decision.enabled is True

    def test_the_shared_variable_covers_clients_with_their_own(self) -> None:
        """...but KAIBAN_TELEMETRY_OPT_OUT, like DO_NOT_TRACK, switches every client off."""
        decision = decide(Settings(opt_out_env="MYLIB_NO_TELEMETRY"),
                          {"KAIBAN_TELEMETRY_OPT_OUT": "1"})
        assert (decision.enabled, decision.decided_by) == (False, "KAIBAN_TELEMETRY_OPT_OUT")

    def test_opt_out_beats_debug(self) -> None:
        """Opted out, debug mode is off too: nothing is printed either."""
        decision = decide(Settings(debug=True), {"DO_NOT_TRACK": "1"})
        assert (decision.enabled, decision.debug) == (False, False)

    def test_app_id_argument_beats_environment(self) -> None:
        """An app ID given in code beats KAIBAN_TELEMETRY_APP_ID."""
        decision = decide(Settings(app_id="from-code"), {"KAIBAN_TELEMETRY_APP_ID": "from-env"})
        assert decision.app_id == "from-code"

    def test_app_id_from_environment(self) -> None:
        """Without an argument, the app ID comes from the environment."""
        app = "6C1A37E0-2F4B-4E8D-9B7A-3D5E1F2A4C60"
        assert decide(Settings(), {"KAIBAN_TELEMETRY_APP_ID": f" {app} "}).app_id == app

    def test_app_id_from_environment_must_be_a_uuid(self) -> None:
        """A malformed app ID from the environment is ignored (logged once), so nothing is sent."""
        assert decide(Settings(), {"KAIBAN_TELEMETRY_APP_ID": "my-app"}).app_id is None

    def test_debug_from_environment_unless_code_says(self) -> None:
        """KAIBAN_TELEMETRY_DEBUG turns debug on unless code chose explicitly."""
        assert decide(Settings(), {"KAIBAN_TELEMETRY_DEBUG": "1"}).debug is True
        assert decide(Settings(debug=False), {"KAIBAN_TELEMETRY_DEBUG": "1"}).debug is False


class TestEndpoint:
    @pytest.mark.parametrize("url", ["https://nom.telemetrydeck.com/v2/", "http://127.0.0.1:9/v2/",
                                     "http://localhost/v2/", "http://[::1]:80/v2/",
                                     "https://télémétrie.example/v2/"])
    def test_usable_endpoints(self, url: str) -> None:
        """https anywhere, and plain http to loopback, are accepted."""
        assert endpoint_problem(url) is None

    @pytest.mark.parametrize("url", ["http://example.com/v2/", "ftp://127.0.0.1/", "nonsense",
                                     "https://ingest.example/v2/\r\nX-Injected: 1",
                                     "https://ingest.example/v 2/", "https://ingest.\x00example/",
                                     "https://\u2603.example/v2/"])
    def test_unusable_endpoints(self, url: str) -> None:
        """Plain http across a network, other schemes, non-URLs, URLs that could break
        the request line or add a header, and host names IDNA cannot encode are refused."""
        assert endpoint_problem(url) is not None

    def test_default_and_namespace(self) -> None:
        """The default is TelemetryDeck v2; a namespace adds /namespace/<ns>/."""
        assert ingest_url(Settings(), {}) == "https://nom.telemetrydeck.com/v2/"
        assert (ingest_url(Settings(namespace="kaiban"), {})
                == "https://nom.telemetrydeck.com/v2/namespace/kaiban/")

    def test_environment_endpoint(self) -> None:
        """KAIBAN_TELEMETRY_ENDPOINT replaces the default when code gives none."""
        env = {"KAIBAN_TELEMETRY_ENDPOINT": "http://127.0.0.1:5000/v2"}
        assert ingest_url(Settings(), env) == "http://127.0.0.1:5000/v2/"

    def test_bad_environment_endpoint_sends_nothing(self, caplog: pytest.LogCaptureFixture) -> None:
        """A clear-text endpoint from the environment is ignored with a warning naming the variable."""
        env = {"KAIBAN_TELEMETRY_ENDPOINT": "http://example.com/v2/"}
        assert ingest_url(Settings(), env) is None


class TestSettingsValidation:
    @pytest.mark.parametrize(("change", "named"), [
        ({"app_id": ""}, "app_id"),
        ({"app_id": "YOUR-TELEMETRYDECK-APP-ID"}, "UUID"),
        ({"endpoint": "http://example.com/"}, "endpoint"),
        ({"namespace": "a/b"}, "namespace"),
        ({"batch_size": 101}, "batch_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"flush_interval": -1}, "flush_interval"),
        ({"timeout": "3"}, "timeout"),
        ({"test_mode": "yes"}, "test_mode"),
        ({"opt_out_env": "not a name"}, "opt_out_env"),
        ({"max_queue": 0}, "max_queue"),
    ])
    def test_bad_values_raise_naming_the_setting(self, change: dict, named: str) -> None:
        """A bad code-given value raises ConfigurationError (a ValueError) naming the setting."""
        with pytest.raises(ConfigurationError, match=named):
            Settings().replace(**change)
        assert issubclass(ConfigurationError, ValueError)

    def test_unknown_setting_is_a_type_error(self) -> None:
        """A misspelt setting is refused, not ignored."""
        with pytest.raises(TypeError, match="app_idd"):
            Settings().replace(app_idd="x")

    def test_none_leaves_a_setting_as_it_is(self) -> None:
        """None means "leave as is", so configure() can be called piecemeal."""
        settings = Settings().replace(salt="s", test_mode=True)
        assert settings.replace(salt=None, test_mode=False).salt == "s"
