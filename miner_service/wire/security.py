"""Transport security and authentication: TLS (optionally mutual) and a bearer token on every RPC.

Secrets (token, private keys) are read from files or the environment, held in memory, and never logged.
The standard health service stays open without a token, so that orchestrators' gRPC probes work.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
TOKEN_ENV = "HELIP_AUTH_TOKEN"  # outside HELIP_MINER_*, which maps onto config fields
# The userinfo of a URL ("scheme://user:password@"): Redis URLs carry their password there.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@\s]*@")


@dataclass(frozen=True)
class SecurityConfig:
    """TLS (optionally mutual) and the bearer token every RPC must carry. Files only: secrets never sit in a config."""

    tls_cert_file: str = ""  # server certificate chain (PEM); with tls_key_file: TLS on
    tls_key_file: str = ""  # TLS private key (PEM) of tls_cert_file
    tls_client_ca_file: str = ""  # when set, clients must present a certificate signed by this CA (mutual TLS)
    token_file: str = ""  # bearer token required on every RPC (else $HELIP_AUTH_TOKEN, else none)

    def __post_init__(self):
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("security.tls_cert_file and security.tls_key_file come together (TLS needs both)")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("security.tls_client_ca_file needs security.tls_cert_file and security.tls_key_file")

    def __repr__(self) -> str:  # file names only; never contents
        return (
            f"SecurityConfig(tls={'on' if self.tls_cert_file else 'off'}, "
            f"mutual={'on' if self.tls_client_ca_file else 'off'}, token={'on' if self.token_file else 'env/off'})"
        )


def read_secret(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{what}: cannot read {path} ({error.strerror})") from None


def load_token(token_file: str, environ=os.environ) -> str | None:
    """The bearer token from `token_file` (stripped), else $HELIP_AUTH_TOKEN, else None."""
    if token_file:
        token = read_secret(token_file, "token_file").decode().strip()
        if not token:
            raise ValueError(f"token_file: {token_file} is empty")
        return token
    return environ.get(TOKEN_ENV) or None


def server_credentials(config: SecurityConfig) -> grpc.ServerCredentials | None:
    if not (config.tls_cert_file or config.tls_key_file):
        if config.tls_client_ca_file:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return None
    if not (config.tls_cert_file and config.tls_key_file):
        raise ValueError("TLS needs both tls_cert_file and tls_key_file")
    key = read_secret(config.tls_key_file, "tls_key_file")
    cert = read_secret(config.tls_cert_file, "tls_cert_file")
    client_ca = read_secret(config.tls_client_ca_file, "tls_client_ca_file") if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call whose `authorization` metadata is not `Bearer <token>` with UNAUTHENTICATED."""

    def __init__(self, token: str, on_refused=None):
        self._expected = f"Bearer {token}".encode()
        self._on_refused = on_refused

        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: missing or wrong bearer token")

        self._refuse_unary = grpc.unary_unary_rpc_method_handler(refuse)
        self._refuse_stream = grpc.stream_unary_rpc_method_handler(refuse)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(HEALTH_PREFIX):
            return continuation(handler_call_details)
        presented = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(presented.encode(), self._expected):
            return continuation(handler_call_details)
        if self._on_refused is not None:
            self._on_refused(method.rsplit("/", 1)[-1])
        return self._refuse_stream if method.endswith("/UpsertStream") else self._refuse_unary


def channel_credentials(ca_file: str = "", cert_file: str = "", key_file: str = "") -> grpc.ChannelCredentials:
    """Client TLS: trust `ca_file` (else the system roots); present cert/key for mutual TLS."""
    return grpc.ssl_channel_credentials(
        root_certificates=read_secret(ca_file, "tls_ca_file") if ca_file else None,
        private_key=read_secret(key_file, "tls_key_file") if key_file else None,
        certificate_chain=read_secret(cert_file, "tls_cert_file") if cert_file else None,
    )


def redact_url(text: str) -> str:
    """`text` with the password of every URL in it masked: redis://:***@redis:6379/0, rediss://user:***@host."""
    return _URL_USERINFO.sub(r"\g<scheme>\g<user>:***@", text)


class RedactingFilter(logging.Filter):
    """A handler filter that masks URL passwords in every record it passes, whichever module logged it.

    Installed on handlers (not loggers) so that records propagated from any library logger go through it; the
    traceback of a logged exception is formatted here and masked too (redis errors may quote their URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_url(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_url(record.exc_text)
        return True
