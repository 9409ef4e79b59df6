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
    """Context for outbound associations: verify the peer with the CA bundle, present our certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # DICOM peers are addressed by IP as often as by name; trust comes from the CA bundle.
    context.check_hostname = False
    try:
        if tls.ca_certificates:
            context.load_verify_locations(cafile=str(tls.ca_certificates))
        if tls.certificate and tls.private_key:
            context.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.private_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load TLS certificate/key/CA: {exc}") from exc
    return context
