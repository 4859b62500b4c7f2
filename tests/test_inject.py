"""Secrets injection, the pure part: placeholders, headers (Basic auth included), masking what comes back."""

from __future__ import annotations

import base64
import random

from vivarium import credentials
from vivarium.net import inject
from vivarium.net.inject import Masker, Secret

REAL = "sk-ant-api03-" + "Zx9" * 30 + "-AAAA"
GH = "ghp_" + "a1B2c3D4e5" * 4


def secret(value: str = REAL, hosts: tuple[str, ...] = ("api.anthropic.com",), header: str | None = None, name: str = "KEY") -> Secret:
    return Secret(name, credentials.make_placeholder(value), value, hosts, header)


def test_a_placeholder_looks_like_the_real_thing_and_is_random() -> None:
    ph = credentials.make_placeholder(REAL)
    assert ph.startswith("sk-ant-api03-") and len(ph) == len(REAL) and ph != REAL
    assert ph != credentials.make_placeholder(REAL)  # random each time it is made
    gh = credentials.make_placeholder(GH)
    assert gh.startswith("ghp_") and len(gh) == len(GH)
    assert credentials.prefix_of("github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz") == "github_pat_"
    short = credentials.make_placeholder("abc")  # a value too short to keep a prefix of: 16 random
    assert len(short) == 16


def test_the_real_value_goes_in_only_to_the_secrets_hosts() -> None:
    s = secret()
    headers = [(b"Host", b"api.anthropic.com"), (b"x-api-key", s.placeholder.encode()), (b"Accept", b"*/*")]
    out = inject.inject(headers, "api.anthropic.com", 443, [s])
    assert out.headers[1] == (b"x-api-key", REAL.encode()) and out.injected == ["KEY"] and out.withheld == []
    assert out.headers[0] == headers[0] and out.headers[2] == headers[2]
    # anywhere else the placeholder passes through unchanged, and the gateway can say so
    out = inject.inject(headers, "evil.example.org", 443, [s])
    assert out.headers == headers and out.injected == [] and out.withheld == ["KEY"]
    # a wildcard host, and a port that is not the rule's
    w = secret(GH, hosts=("*.github.com:443",), name="GH")
    bearer = [(b"Authorization", b"Bearer " + w.placeholder.encode())]
    assert inject.inject(bearer, "api.github.com", 443, [w]).headers == [(b"Authorization", b"Bearer " + GH.encode())]
    assert inject.inject(bearer, "api.github.com", 8443, [w]).withheld == ["GH"]
    assert inject.inject(bearer, "github.com", 443, [w]).withheld == ["GH"]  # *.github.com is not github.com


def test_basic_auth_is_decoded_replaced_and_encoded_again() -> None:
    s = secret(GH, hosts=("github.com",), name="GITHUB_TOKEN")
    token = base64.b64encode(f"x-access-token:{s.placeholder}".encode())
    out = inject.inject([(b"authorization", b"Basic " + token)], "github.com", 443, [s])
    scheme, _, sent = out.headers[0][1].partition(b" ")
    assert scheme == b"Basic" and base64.b64decode(sent) == f"x-access-token:{GH}".encode()
    assert out.injected == ["GITHUB_TOKEN"]
    garbage = [(b"authorization", b"Basic !!!not-base64")]
    assert inject.inject(garbage, "github.com", 443, [s]).headers == garbage


def test_a_secret_bound_to_one_header_goes_in_no_other() -> None:
    s = secret(header="x-api-key")
    headers = [(b"x-api-key", s.placeholder.encode()), (b"x-debug", s.placeholder.encode())]
    out = inject.inject(headers, "api.anthropic.com", 443, [s])
    assert out.headers == [(b"x-api-key", REAL.encode()), (b"x-debug", s.placeholder.encode())]
    assert out.injected == ["KEY"] and out.withheld == ["KEY"]


def test_masking_turns_the_value_back_across_any_chunking() -> None:
    s, g = secret(), secret(GH, name="GH")
    body = b'{"echo": "' + REAL.encode() + b'", "again": "' + REAL.encode() + b'", "gh": "' + GH.encode() + b'"}' * 3
    want = body.replace(REAL.encode(), s.placeholder.encode()).replace(GH.encode(), g.placeholder.encode())
    rng = random.Random(7)
    for _ in range(200):  # bounded: random cut points, including one byte at a time
        m, out, i = Masker([s, g]), b"", 0
        while i < len(body):
            n = rng.randint(1, 40)
            out += m.feed(body[i : i + n])
            i += n
        out += m.flush()
        assert out == want and len(out) == len(body)
    assert REAL.encode() not in want
    # a stream of events is not held up: only a tail that may begin a value waits for more
    m = Masker([s, g])
    assert m.feed(b"data: {}\n\n") == b"data: {}\n\n"
    assert m.feed(b"event: x\ndata: sk-ant-") == b"event: x\ndata: " and m.flush() == b"sk-ant-"
    nothing = Masker([])
    assert nothing.feed(b"abc") == b"abc" and nothing.flush() == b""


def test_every_request_head_on_a_connection_is_rewritten_and_no_body() -> None:
    s = secret()
    ph, real = s.placeholder.encode(), REAL.encode()
    body = b"placeholder in a body stays: " + ph
    stream = (b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nx-api-key: " + ph + b"\r\nContent-Length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body
              + b"GET /v1/models HTTP/1.1\r\nHost: api.anthropic.com\r\nX-Api-Key:" + ph + b"\r\n\r\n")  # fmt: skip
    for cut in (1, 7, 50, len(stream)):  # however the stream is split, pipelined or not
        r = inject.RequestRewriter("api.anthropic.com", 443, [s])
        out, notes = b"", []
        for i in range(0, len(stream), cut):
            chunk, n = r.feed(stream[i : i + cut])
            out += chunk
            notes += n
        assert out.count(real) == 2 and out.count(ph) == 1 and out.endswith(b"X-Api-Key: " + real + b"\r\n\r\n")
        assert [n.injected for n in notes] == [["KEY"], ["KEY"]]
    head, note = inject.rewrite_head(b"GET / HTTP/1.1\r\nHost: evil.example.org\r\nx-api-key: " + ph + b"\r\n\r\n", "evil.example.org", 443, [s])
    assert ph in head and real not in head and note.withheld == ["KEY"]


def test_only_the_lines_that_hold_a_placeholder_are_touched() -> None:
    s, basic = secret(), secret(GH, ("github.com",), name="GH")
    ph, real = s.placeholder.encode(), REAL.encode()
    token = base64.b64encode(b"x-access-token:" + basic.placeholder.encode())
    head = (b"GET / HTTP/1.1\r\nHost:   api.anthropic.com\r\nX-Odd :  kept\r\nAUTHORIZATION: Basic " + token
            + b"\r\nx-api-key:\t" + ph + b"\r\n\r\n")  # fmt: skip
    out, note = inject.rewrite_head(head, "api.anthropic.com", 443, [s, basic])
    assert out == head.replace(b"x-api-key:\t" + ph, b"x-api-key: " + real)  # the rest byte for byte
    assert note.injected == ["KEY"] and note.withheld == ["GH"]  # Basic auth found in any case, withheld from this host
    # a placeholder in the request line (a URL) stays: only header values get the real thing
    out, note = inject.rewrite_head(b"GET /?key=" + ph + b" HTTP/1.1\r\nx-api-key: " + ph + b"\r\n\r\n", "api.anthropic.com", 443, [s])
    assert out == b"GET /?key=" + ph + b" HTTP/1.1\r\nx-api-key: " + real + b"\r\n\r\n" and note.injected == ["KEY"]
