"""Settings read from the environment and a file: what an admin writes is checked before the node starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.errors import ConfigurationError
from dicom_node.settings import load_settings


@pytest.mark.parametrize(
    ("variable", "value", "setting"),
    [
        ("CXR_NODE__DICOM__AE_TITLE", "CXR\tNODE", "dicom.ae_title"),  # pynetdicom's traceback at serve
        ("CXR_NODE__DICOM__AE_TITLE", "CXRN\u00d6DE", "dicom.ae_title"),
        ("CXR_NODE__DICOM__CALLERS", '[{"ae_title": "PACS\\u0001"}]', "dicom.callers.0.ae_title"),
        ("CXR_NODE__DICOM__CALLERS", '[{"ae_title": "PACS", "reply_to": "A_TITLE_OF_17_CHR"}]',
         "dicom.callers.0.reply_to"),
        ("CXR_NODE__DICOM__DESTINATIONS", '[{"ae_title": "PA\\\\CS", "host": "pacs", "port": 104}]',
         "dicom.destinations.0.ae_title"),
        ("CXR_NODE__PIPELINE__FIXED_DESTINATIONS", '["ARCHIVE\\n"]', "pipeline.fixed_destinations.0"),
    ],
)
def test_an_ae_title_dicom_does_not_allow_is_a_setting_error(
    cli_env: pytest.MonkeyPatch, variable: str, value: str, setting: str
) -> None:
    cli_env.setenv(variable, value)
    with pytest.raises(ConfigurationError) as raised:
        load_settings()
    assert f"{setting}: Value error, AE title must be 1-16 printable ASCII characters" in str(raised.value)


def test_ae_titles_in_settings_lose_their_insignificant_spaces(
    cli_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("dicom:\n  ae_title: ' CXRNODE '\n  callers: [{ae_title: 'PACS ', reply_to: ' PACS'}]\n"
                      "  destinations: [{ae_title: ' PACS', host: pacs, port: 104}]\n"
                      "pipeline:\n  fixed_destinations: [' ARCHIVE ']\n")
    settings = load_settings(config)
    assert settings.dicom.ae_title == "CXRNODE"
    assert (settings.dicom.callers[0].ae_title, settings.dicom.callers[0].reply_to) == ("PACS", "PACS")
    assert settings.dicom.destinations[0].ae_title == "PACS"
    assert settings.pipeline.fixed_destinations == ["ARCHIVE"]


@pytest.mark.parametrize("key", ["changeme", "0123456789abcdef0123456789abcde"])
def test_a_short_console_secret_key_is_refused_without_quoting_it(
    cli_env: pytest.MonkeyPatch, key: str
) -> None:
    """It signs the device cookies that exempt a browser from login lockouts: guessed, they can be forged."""
    cli_env.setenv("CXR_NODE__WEB__SECRET_KEY", key)
    with pytest.raises(ConfigurationError) as raised:
        load_settings()
    said = str(raised.value)
    assert "web.secret_key: Value error, must be at least 32 characters" in said
    assert "(from CXR_NODE__WEB__SECRET_KEY)" in said and key not in said


def test_a_console_secret_key_of_32_characters_is_taken(cli_env: pytest.MonkeyPatch) -> None:
    cli_env.setenv("CXR_NODE__WEB__SECRET_KEY", "0123456789abcdef" * 2)
    key = load_settings().web.secret_key
    assert key is not None and key.get_secret_value() == "0123456789abcdef" * 2


@pytest.mark.parametrize("given", ["certificate: /etc/cxr-node/tls/node.crt",
                                   "private_key: /etc/cxr-node/tls/node.key"])
def test_a_tls_certificate_without_its_key_or_a_key_without_its_certificate_is_a_setting_error(
    cli_env: pytest.MonkeyPatch, tmp_path: Path, given: str
) -> None:
    """With the listener plain, one of the two was ignored without a word: every TLS destination was called
    without the node's certificate, and one that asks for it refused each delivery (review)."""
    config = tmp_path / "node.yaml"
    config.write_text(f"dicom:\n  tls:\n    {given}\n    ca_certificates: /etc/cxr-node/tls/ca.pem\n")
    with pytest.raises(ConfigurationError) as raised:
        load_settings(config)
    assert "dicom.tls: Value error, dicom.tls needs both certificate and private_key, or neither" in str(
        raised.value)
