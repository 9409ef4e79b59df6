"""SSL contexts for DICOM TLS (PS3.15 Annex B), built from the node's TLS settings."""

from __future__ import annotations

import ssl
from collections.abc import Callable

from dicom_node.errors import ConfigurationError
from dicom_node.settings import TlsSettings


def _load(tls: TlsSettings, load: Callable[[], object], *settings: str) -> None:
    """Run ``load`` (a context's load_cert_chain or load_verify_locations); a failure names the settings
    and their files: "No such file or directory" alone left an operator guessing which of three."""
    try:
        load()
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(f"dicom.tls.{name} {getattr(tls, name)}" for name in settings)
        said = exc.strerror if isinstance(exc, OSError) and exc.strerror else (
            getattr(exc, "reason", None) or str(exc))
        raise ConfigurationError(f"cannot load {files}: {said}") from exc


class _EncryptedKey(Exception):  # noqa: N818 - a signal from OpenSSL's passphrase callback, not an error
    """The private key asks for a passphrase."""


def _no_passphrase() -> bytes:
    """OpenSSL's passphrase callback: there is none to give. Without one OpenSSL prompted "Enter PEM pass
    phrase:" on the terminal, where an interactive node (its outbox thread at a TLS delivery) waited, or,
    without a terminal, failed with "Invalid argument" (review)."""
    raise _EncryptedKey


def _load_identity(tls: TlsSettings, context: ssl.SSLContext) -> None:
    """The node's certificate and private key into ``context``."""
    try:
        _load(tls, lambda: context.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.private_key),
                                                   password=_no_passphrase),
              "certificate", "private_key")
    except _EncryptedKey:
        raise ConfigurationError(
            f"cannot load dicom.tls.certificate {tls.certificate}, dicom.tls.private_key {tls.private_key}: "
            "the private key is encrypted with a passphrase, which the node cannot be given; store it "
            "decrypted (openssl pkey -in KEY -out NEW_KEY), readable by the node's user only"
        ) from None


#: What OpenSSL's reason for a failed handshake says of the peer, for those an operator cannot read: a
#: modality without a client certificate, or set to a DICOM TLS profile older than BCP 195 (the AES
#: profile's TLS_RSA_WITH_AES_128_CBC_SHA, TLS 1.0/1.1), was logged as a bare NO_SHARED_CIPHER (review).
_IN_WORDS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "presented no certificate (dicom.tls.require_client_certificate)",
    "NO_SHARED_CIPHER": "offers no cipher suite of the BCP 195 TLS profiles (ECDHE or DHE key exchange); "
                        "the older AES and Basic DICOM TLS profiles are not supported",
    "UNSUPPORTED_PROTOCOL": "offers only TLS versions older than 1.2",
}


def handshake_failure(exc: OSError, peer: str) -> str:
    """Why a TLS handshake with ``peer`` ("the caller", "the destination") failed, in words: the
    verification message for a certificate the node does not trust, the peer's alert when the peer refused
    (usually the node's certificate), else OpenSSL's reason. pynetdicom and a bare ``exc.reason`` gave
    only CERTIFICATE_VERIFY_FAILED, whether the certificate had expired or came from another CA."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"{peer}'s certificate is not trusted ({exc.verify_message or exc.reason})"
    reason = str(getattr(exc, "reason", None) or exc.strerror or type(exc).__name__)
    if "ALERT" in reason:
        return f"{peer} refused the handshake ({reason})"
    if reason in _IN_WORDS:
        return f"{peer} {_IN_WORDS[reason]} ({reason})"
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE"):
        return f"{peer} does not speak TLS ({reason})"
    return reason


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """Context for the listener: our certificate; peers verified against the CA bundle when required."""
    if not (tls.certificate and tls.private_key):
        raise ConfigurationError("dicom.tls needs certificate and private_key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_identity(tls, context)
    if tls.ca_certificates:
        _load(tls, lambda: context.load_verify_locations(cafile=str(tls.ca_certificates)), "ca_certificates")
    if tls.require_client_certificate:
        if not tls.ca_certificates:
            raise ConfigurationError("dicom.tls.require_client_certificate needs ca_certificates")
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_OPTIONAL if tls.ca_certificates else ssl.CERT_NONE
    return context


def client_context(tls: TlsSettings) -> ssl.SSLContext:
    """Context for outbound associations: verify the peer, present our certificate when we have one.

    With a CA bundle, only that bundle is trusted and the host name is not checked: DICOM peers are
    addressed by IP as often as by name, and the hospital's CA vouches for its DICOM nodes. Without one,
    the system's public CAs are trusted, and then only for the host name they certify (a public CA
    vouches for names, not for "a PACS": without the check any public certificate would do).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, host name checked
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ca_certificates:
        context.check_hostname = False
        _load(tls, lambda: context.load_verify_locations(cafile=str(tls.ca_certificates)), "ca_certificates")
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.certificate and tls.private_key:
        _load_identity(tls, context)
    return context
