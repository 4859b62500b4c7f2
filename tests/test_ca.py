"""A sandbox's CA: made once, key owner-only; the certificates it signs are trusted by a client that trusts it, only."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest

from vivarium.net.ca import CA


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> str | None:
    """A TLS handshake in memory; the ALPN protocol chosen. Raises ssl.SSLError when the client refuses."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=name)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(20):  # bounded: a handshake is a few round trips
        done = 0
        for side in (c, s):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done == 2:
            return c.selected_alpn_protocol()
    raise AssertionError("the handshake did not finish")


def trusting(ca_file: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


def test_a_sandbox_ca_signs_what_its_guest_trusts_and_nothing_else(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    ca = CA.of(a, "a")
    assert os.stat(a / "ca.key").st_mode & 0o777 == 0o600
    assert CA.of(a, "a").cert == ca.cert  # kept: the same CA at every start
    assert handshake(ca.server_context("api.example.org"), trusting(a / "ca.crt"), "api.example.org") == "http/1.1"
    with pytest.raises(ssl.SSLCertVerificationError, match=r"Hostname mismatch|doesn.t match"):
        handshake(ca.server_context("api.example.org"), trusting(a / "ca.crt"), "other.example.org")
    CA.of(b, "b")  # another sandbox's guest trusts another CA
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ca.server_context("api.example.org"), trusting(b / "ca.crt"), "api.example.org")
    assert ca.server_context("api.example.org") is ca.server_context("api.example.org")  # one per host, in memory
    assert "PRIVATE KEY" not in ca.cert_pem()
