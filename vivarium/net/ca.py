"""A sandbox's own certificate authority: what lets the gateway speak TLS to the guest for a secret's host,
and show a denied HTTPS client the 403 page that says why.

Made at a sandbox's first start and kept in its directory on the host, the key owner-only: it never
enters the guest, which gets only the certificate for its trust store. The CA may sign nothing but
server certificates (path length 0), and the gateway makes one per host name it terminates, on demand,
short-lived, kept in memory. Another sandbox's guest does not trust this one's CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vivarium import state

CERT = "ca.crt"
KEY = "ca.key"
CA_DAYS = 3650
LEAF_DAYS = 7
MAX_CONTEXTS = 256  # server certificates kept in memory (made on demand, for a secret's host or a denial page)
ALPN = ("http/1.1",)  # what the gateway parses
SIGNS_CERTIFICATES = x509.KeyUsage(
    digital_signature=True,
    key_cert_sign=True,
    crl_sign=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    encipher_only=False,
    decipher_only=False,
)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    _contexts: dict[str, ssl.SSLContext] = field(default_factory=dict)

    @classmethod
    def of(cls, directory: Path, name: str) -> CA:
        """The sandbox's CA in `directory`: made the first time (the key owner-only), then the same one."""
        try:
            key = serialization.load_pem_private_key((directory / KEY).read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate((directory / CERT).read_bytes())
        except (OSError, ValueError):
            return cls.make(directory, name)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            return cls.make(directory, name)
        return cls(cert, key)

    @classmethod
    def make(cls, directory: Path, name: str) -> CA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"vivarium sandbox {name} CA")])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(SIGNS_CERTIFICATES, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        state.write_atomic(directory / KEY, pem_key.decode(), 0o600)
        state.write_atomic(directory / CERT, cert.public_bytes(serialization.Encoding.PEM).decode(), 0o644)
        return cls(cert, key)

    def cert_pem(self) -> str:
        """The certificate the guest trusts."""
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def leaf(self, host: str) -> tuple[bytes, bytes]:
        """(certificate chain PEM, key PEM) for a server named `host`, signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            alt = x509.DNSName(host)
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.cert.public_bytes(serialization.Encoding.PEM)
        return chain, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    def server_context(self, host: str) -> ssl.SSLContext:
        """A TLS server context presenting `host`'s certificate (made once per host, kept in memory)."""
        ctx = self._contexts.get(host)
        if ctx is None:
            chain, key = self.leaf(host)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_alpn_protocols(list(ALPN))
            # load_cert_chain takes a file only: one in memory, this process's alone (the gateway that asks
            # may have dropped root, and a directory it could write need not exist; nor does the key touch a disk)
            fd = os.memfd_create("vivarium-leaf", os.MFD_CLOEXEC)
            try:
                os.write(fd, chain + key)
                ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
            while len(self._contexts) >= MAX_CONTEXTS:  # a guest naming host after host: the oldest go
                del self._contexts[next(iter(self._contexts))]
            self._contexts[host] = ctx
        return ctx
