"""SSL contexts for DICOM TLS (PS3.15 Annex B), built from the node's TLS settings."""

from __future__ import annotations

import ssl

from dicom_node.errors import ConfigurationError
from dicom_node.settings import TlsSettings


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """Context for the listener: our certificate; peers verified against the CA bundle when required."""
    if not (tls.certificate and tls.private_key):
        raise ConfigurationError("dicom.tls needs certificate and private_key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.private_key))
        if tls.ca_certificates:
            context.load_verify_locations(cafile=str(tls.ca_certificates))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load TLS certificate/key/CA: {exc}") from exc
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
    try:
        if tls.ca_certificates:
            context.check_hostname = False
            context.load_verify_locations(cafile=str(tls.ca_certificates))
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if tls.certificate and tls.private_key:
            context.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.private_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load TLS certificate/key/CA: {exc}") from exc
    return context
