"""
Certificates made at test time (with C{cryptography}, which Twisted's TLS
brings): a CA, certificates it signs for servers and clients, written as
PEM files (keys mode 600), for the tests of TLS to etcd.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: How long the certificates made here are valid (from a minute ago).
VALIDITY = datetime.timedelta(days=1)


def _name(commonName: str | None, organisation: str = "xenddev tests") -> x509.Name:
    """A subject: the organisation, and the CN when given."""
    parts = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation)]
    if commonName is not None:
        parts.append(x509.NameAttribute(NameOID.COMMON_NAME, commonName))
    return x509.Name(parts)


def _key() -> ec.EllipticCurvePrivateKey:
    """A new P-256 key (fast to make)."""
    return ec.generate_private_key(ec.SECP256R1())


@attrs.frozen
class Issued:
    """A certificate and its key, and the files they were written to."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    certFile: str
    keyFile: str


def _write(path: str, data: bytes, mode: int) -> str:
    """Write C{data} to a new file with C{mode}."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return path


def _keyPEM(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    """A key as PEM (PKCS#8), encrypted with C{passphrase} when given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


class CertificateAuthority:
    """A certificate authority in C{directory} that issues certificates there."""

    def __init__(self, directory: str, name: str = "ca") -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.name = name
        self.key = _key()
        now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
        subject = _name(f"xenddev test CA {name}")
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.certFile = _write(
            os.path.join(directory, f"{name}.pem"),
            self.certificate.public_bytes(serialization.Encoding.PEM),
            0o644,
        )

    def issue(
        self,
        name: str,
        *,
        commonName: str | None = None,
        addresses: Sequence[str] = (),
        dnsNames: Sequence[str] = (),
        server: bool = False,
        client: bool = True,
        notBefore: datetime.datetime | None = None,
        notAfter: datetime.datetime | None = None,
        passphrase: bytes | None = None,
    ) -> Issued:
        """
        A certificate for C{name}'s files (C{<name>.pem}, C{<name>.key}):
        its subject the CN when given (an etcd client under authentication
        needs none), its names the IP C{addresses} and C{dnsNames}.
        """
        key = _key()
        now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(commonName))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(notBefore or now)
            .not_valid_after(notAfter or now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
        names += [x509.DNSName(d) for d in dnsNames]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        certFile = _write(
            os.path.join(self.directory, f"{name}.pem"),
            certificate.public_bytes(serialization.Encoding.PEM),
            0o644,
        )
        keyFile = _write(
            os.path.join(self.directory, f"{name}.key"), _keyPEM(key, passphrase), 0o600
        )
        return Issued(certificate, key, certFile, keyFile)


def writeSecret(path: str, text: str, mode: int = 0o600) -> str:
    """A secret file (a password) with C{mode}."""
    return _write(path, text.encode("utf-8"), mode)
