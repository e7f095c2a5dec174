"""The uplink's HTTPS transport over real TLS on loopback: pinning, the hub's error bodies, HTTPS_PROXY."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from edge_node.uplink.errors import HubRefusedError, HubUnreachableError, PinningError
from edge_node.uplink.transport import HubTransport, fetch_certificate, normalize_fingerprint
from tests.support.tls import ConnectProxy, https_server, self_signed


def _hub(method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, object]]:
    if path.startswith("/v1/refuse"):
        return 409, {"code": "duplicate_update", "reason": "a different update was accepted already"}
    return 200, {"path": path, "auth": headers.get("Authorization", "")}


def test_fetch_certificate_checks_the_fingerprint(tmp_path: Path) -> None:
    cert = self_signed(tmp_path)
    other = self_signed(tmp_path / "other")
    with https_server(cert, _hub) as url:
        pem = fetch_certificate(url, cert.sha256.upper())  # as people write it: case does not matter
        assert pem.strip() == cert.pem.strip()
        with pytest.raises(PinningError, match="join code"):
            fetch_certificate(url, other.sha256)


def test_pinned_transport_refuses_another_certificate(tmp_path: Path) -> None:
    cert = self_signed(tmp_path)
    impostor = self_signed(tmp_path / "impostor")
    with (
        https_server(impostor, _hub) as url,
        HubTransport(url, cert.pem) as transport,
        pytest.raises(PinningError, match="pinned certificate"),
    ):
        transport.request("GET", "/v1/health")


def test_requests_and_error_bodies(tmp_path: Path) -> None:
    cert = self_signed(tmp_path)
    with https_server(cert, _hub) as url, HubTransport(url, cert.pem) as transport:
        answer = transport.request("GET", "/v1/health").json()
        assert answer["path"] == "/v1/health"
        with pytest.raises(HubRefusedError) as refused:
            transport.request("POST", "/v1/refuse", json={})
    assert refused.value.status == 409
    assert refused.value.code == "duplicate_update"
    assert "accepted already" in refused.value.reason


def test_unreachable_hub(tmp_path: Path) -> None:
    cert = self_signed(tmp_path)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with (
        HubTransport(f"https://127.0.0.1:{port}", cert.pem, timeout=2) as transport,
        pytest.raises(HubUnreachableError),
    ):
        transport.request("GET", "/v1/health")


def test_https_proxy_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert = self_signed(tmp_path)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with https_server(cert, _hub) as url, ConnectProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        assert fetch_certificate(url, cert.sha256)
        with HubTransport(url, cert.pem) as transport:
            assert transport.request("GET", "/v1/health").json()["path"] == "/v1/health"
    host_port = url.removeprefix("https://")
    assert proxy.targets == [host_port, host_port]  # both went through the tunnel, pin still checked


def test_fingerprint_format() -> None:
    digest = "ab" * 32
    assert normalize_fingerprint(":".join(["AB"] * 32)) == digest
    with pytest.raises(PinningError):
        normalize_fingerprint("not-a-fingerprint")
