"""HTTPS to the hub with its certificate pinned: the only trust anchor is the certificate the join code named.

A clinic's node talks to exactly one hub, whose certificate is usually self-signed: public CAs add nothing and
an intercepting proxy must not be able to read or change the traffic. So the node trusts only the pinned
certificate (as a trust anchor, without a hostname check, since the join code's URL may be an IP address), and
after every response it checks again that the peer's certificate is the pinned one. ``HTTPS_PROXY`` and
``NO_PROXY`` are honoured (httpx reads them): the proxy sees only a CONNECT tunnel.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections.abc import Mapping
from typing import Any

import httpx

from edge_node.uplink.errors import HubRefusedError, HubUnreachableError, PinningError

__all__ = [
    "HubTransport",
    "certificate_fingerprint",
    "fetch_certificate",
    "normalize_fingerprint",
    "pinned_context",
]

logger = logging.getLogger(__name__)

#: Seconds for connect, read and write; a hub that takes longer is treated as unreachable this time.
DEFAULT_TIMEOUT = 15.0


def normalize_fingerprint(value: str) -> str:
    """A SHA-256 fingerprint as 64 lower-case hex digits (colons and case as people write them accepted)."""
    hexdigits = value.replace(":", "").replace(" ", "").lower()
    if len(hexdigits) != 64 or any(ch not in "0123456789abcdef" for ch in hexdigits):
        raise PinningError(f"{value!r} is not a SHA-256 certificate fingerprint (64 hex digits)")
    return hexdigits


def certificate_fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate, lower-case hex: what the join code carries."""
    return hashlib.sha256(der).hexdigest()


def pinned_context(cert_pem: str) -> ssl.SSLContext:
    """A client context that trusts ``cert_pem`` alone, as an anchor even when it is a leaf certificate."""
    context = ssl.create_default_context(cadata=cert_pem)
    # The pin replaces the name check: the URL in a join code may well be a bare IP address.
    context.check_hostname = False
    # Accept the pinned certificate itself as the anchor (an operator's CA-issued leaf has no root here).
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def _peer_der(response: httpx.Response) -> bytes | None:
    stream = response.extensions.get("network_stream")
    if stream is None:
        return None
    ssl_object = stream.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der: bytes | None = ssl_object.getpeercert(True)
    return der


def fetch_certificate(base_url: str, expected_fingerprint: str, *, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Connect to the hub once without trust, check its certificate's fingerprint, and return it as PEM.

    Nothing secret is sent on this connection: a plain GET of the API root. Raises PinningError when the
    certificate is not the expected one, HubUnreachableError when nothing answers.
    """
    expected = normalize_fingerprint(expected_fingerprint)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # checked by fingerprint below, before anything else is sent
    try:
        with (
            httpx.Client(verify=context, timeout=timeout) as client,
            client.stream("GET", base_url.rstrip("/") + "/v1/openapi.json") as response,
        ):
            der = _peer_der(response)
    except httpx.TransportError as exc:
        raise HubUnreachableError(f"cannot reach the hub at {base_url}: {exc}") from exc
    if der is None:
        raise PinningError(f"{base_url} did not present a TLS certificate; the hub URL must be https://")
    got = certificate_fingerprint(der)
    if got != expected:
        raise PinningError(
            f"the server at {base_url} presents certificate {got[:16]}…, not {expected[:16]}… named by the "
            "join code; something between this node and the hub intercepts TLS, or the code is for another "
            "hub: ask the hub operator for a new join code"
        )
    return ssl.DER_cert_to_PEM_cert(der)


class HubTransport:
    """One keep-alive HTTPS client for the hub; raises the uplink's errors instead of httpx's."""

    def __init__(
        self,
        base_url: str,
        cert_pem: str,
        *,
        auth: httpx.Auth | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.fingerprint = certificate_fingerprint(ssl.PEM_cert_to_DER_cert(cert_pem))
        self._client = httpx.Client(
            base_url=self.base_url,
            verify=pinned_context(cert_pem),
            auth=auth,
            timeout=timeout,
            trust_env=True,  # HTTPS_PROXY / NO_PROXY
            headers={"User-Agent": "fedclinic-edge"},
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HubTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        ok: tuple[int, ...] = (200, 201, 202, 204),
        timeout: float | None = None,
    ) -> httpx.Response:
        """Send one request; return the (fully read) response when its status is in ``ok``.

        ``timeout`` (seconds) replaces the client's for this request, e.g. for a long-poll.

        Raises HubRefusedError for any other status (with the hub's error code and reason),
        HubUnreachableError when nothing answered, PinningError when the peer is not the pinned hub.
        """
        request = self._client.build_request(
            method,
            path,
            json=json,
            content=content,
            headers=headers,
            params=params,
            timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
        )
        try:
            response = self._client.send(request, stream=True)
        except httpx.ConnectError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise PinningError(
                    f"the server at {self.base_url} does not present the pinned certificate "
                    f"{self.fingerprint[:16]}…; TLS is intercepted or the hub changed its certificate "
                    "(enroll again with a new join code)"
                ) from exc
            raise HubUnreachableError(f"cannot reach the hub at {self.base_url}: {exc}") from exc
        except httpx.TransportError as exc:
            raise HubUnreachableError(f"no answer from the hub at {self.base_url}: {exc}") from exc
        try:
            der = _peer_der(response)
            if der is not None and certificate_fingerprint(der) != self.fingerprint:
                raise PinningError(f"the server at {self.base_url} is not the pinned hub")
            try:
                response.read()
            except httpx.TransportError as exc:
                raise HubUnreachableError(f"the hub's answer was cut off: {exc}") from exc
        finally:
            response.close()
        if response.status_code not in ok:
            raise _refusal(response)
        return response


def _refusal(response: httpx.Response) -> HubRefusedError:
    """The hub's error body {code, reason} (or FastAPI's {detail}) as an exception."""
    code, reason = f"http_{response.status_code}", response.reason_phrase
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            code = str(error.get("code", code))
            reason = str(error.get("reason", error.get("detail", reason)))
    return HubRefusedError(response.status_code, code, reason)
