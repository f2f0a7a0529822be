# -*- test-case-name: tests.test_pool_etcdtls -*-
"""
TLS for the etcd client: whom to trust, which certificate to show.

L{loadClientTLS} reads C{pool.ca_file} (the certificates that may sign
the members' certificates), C{pool.cert_file} and C{pool.key_file} (this
host's client certificate, for etcd's C{--client-cert-auth}) and checks
them before anything connects, each refusal a L{PoolSettingError} naming
the field: a file missing or unreadable, a key readable by anyone but its
owner, something that is not PEM, an encrypted key (a daemon has nobody
to ask for a passphrase), a certificate that does not match its key or
is outside its validity dates.

Without a CA file the members' certificates are checked against the
system's trust store (as C{etcdctl} and C{curl} do); the member's address
is checked against the certificate's names either way (Twisted's
L{optionsForClientTLS}, with C{service_identity}: a DNS name or an IP
address, as the endpoint is written).

The parsing is C{cryptography}'s; the connections are Twisted's TLS over
pyOpenSSL (C{twisted[tls]}), imported only when TLS is used.
"""

from __future__ import annotations

import datetime
import os
import stat
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from xenddev.pool.errors import PoolSettingError

if TYPE_CHECKING:
    from cryptography import x509
    from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

__all__ = ["ClientTLS", "loadClientTLS", "readSecretFile"]

#: The largest file read as a certificate, key or password (a CA bundle
#: of a few hundred certificates is well under it).
MAX_FILE = 4 * 1024 * 1024


def _read(field: str, path: str, secret: bool) -> bytes:
    """
    The bytes of C{path}; a secret one must be a regular file no one but
    its owner may read (checked on the open file, so what is checked is
    what is read).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise PoolSettingError(field, path, f"cannot open it: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PoolSettingError(field, path, "not a regular file")
        if secret and st.st_mode & 0o077:
            raise PoolSettingError(
                field,
                path,
                f"readable by others (mode {stat.S_IMODE(st.st_mode):o}): chmod 600 it",
            )
        if st.st_size > MAX_FILE:
            raise PoolSettingError(field, path, f"larger than {MAX_FILE} bytes")
        chunks = []
        while data := os.read(fd, 65536):
            chunks.append(data)
        return b"".join(chunks)
    except OSError as e:
        raise PoolSettingError(field, path, f"cannot read it: {e.strerror}") from None
    finally:
        os.close(fd)


def readSecretFile(field: str, path: str) -> bytes:
    """The bytes of a secret file (a key, a password): its owner's alone, or refused."""
    return _read(field, path, secret=True)


def _certificates(field: str, path: str, data: bytes) -> list[x509.Certificate]:
    """Every PEM certificate in C{data} (at least one)."""
    from cryptography import x509

    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise PoolSettingError(field, path, "holds no PEM certificate")
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise PoolSettingError(field, path, f"not PEM certificates: {e}") from None
    if not found:
        raise PoolSettingError(field, path, "holds no PEM certificate")
    return found


def _checkDates(field: str, path: str, cert: x509.Certificate, now: datetime.datetime) -> None:
    """Refuse a certificate outside its validity dates (named by its subject)."""
    subject = cert.subject.rfc4514_string() or "(empty subject)"
    if now < cert.not_valid_before_utc:
        raise PoolSettingError(
            field, path, f"certificate {subject} is not valid before {cert.not_valid_before_utc}"
        )
    if now > cert.not_valid_after_utc:
        raise PoolSettingError(
            field, path, f"certificate {subject} expired on {cert.not_valid_after_utc}"
        )


def _privateKey(field: str, path: str, data: bytes) -> Any:
    """The private key in C{data}: PEM, not encrypted."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PoolSettingError(
            field,
            path,
            "the key is encrypted and the daemon has nobody to ask for its passphrase: "
            "store it unencrypted, mode 600",
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise PoolSettingError(field, path, f"not a PEM private key: {e}") from None


def _publicBytes(key: Any) -> bytes:
    """A public key as DER, for comparing two."""
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _pem(cert: x509.Certificate) -> bytes:
    """A certificate as PEM."""
    from cryptography.hazmat.primitives import serialization

    return bytes(cert.public_bytes(serialization.Encoding.PEM))


class ClientTLS:
    """
    What the client's TLS connections trust and show, loaded and checked.

    @ivar caFile: the CA file, or None for the system's trust store.
    @ivar certFile: the client certificate's file, or None (none shown).
    @ivar clientCommonName: the client certificate's CN, or None.
    """

    def __init__(
        self,
        caFile: str | None,
        trusted: Sequence[x509.Certificate],
        certFile: str | None = None,
        chain: Sequence[x509.Certificate] = (),
        keyPEM: bytes = b"",
    ) -> None:
        self.caFile = caFile
        self.certFile = certFile
        self._trusted = tuple(trusted)
        self._chain = tuple(chain)
        self._keyPEM = keyPEM
        self.clientCommonName: str | None = None
        if self._chain:
            from cryptography.x509.oid import NameOID

            names = self._chain[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            self.clientCommonName = str(names[0].value) if names else None
        self._options: Any = None
        self._creators: dict[str, IOpenSSLClientConnectionCreator] = {}

    @property
    def systemTrust(self) -> bool:
        """Whether the members are checked against the system's trust store."""
        return not self._trusted

    def _twistedOptions(self) -> tuple[Any, Any, list[Any]]:
        """Twisted's trust root, client certificate and extra chain (made once)."""
        if self._options is None:
            from OpenSSL import crypto
            from twisted.internet import ssl

            trustRoot = (
                ssl.trustRootFromCertificates(
                    [ssl.Certificate.loadPEM(_pem(c)) for c in self._trusted]
                )
                if self._trusted
                else None
            )
            client = None
            extra: list[Any] = []
            if self._chain:
                client = ssl.PrivateCertificate.loadPEM(self._keyPEM + _pem(self._chain[0]))
                extra = [crypto.X509.from_cryptography(c) for c in self._chain[1:]]
            self._options = (trustRoot, client, extra)
        return self._options

    def creatorFor(self, host: str) -> IOpenSSLClientConnectionCreator:
        """
        The TLS connection creator for a member at C{host} (a DNS name or
        an IP address, as its endpoint names it): the certificate must
        name it and chain to what is trusted.
        """
        creator = self._creators.get(host)
        if creator is None:
            from twisted.internet import ssl

            trustRoot, client, extra = self._twistedOptions()
            creator = ssl.optionsForClientTLS(
                host,
                trustRoot=trustRoot,
                clientCertificate=client,
                # optionsForClientTLS adds to this dict: a fresh one each time.
                extraCertificateOptions={"extraCertChain": extra} if extra else None,
            )
            self._creators[host] = creator
        return creator


def loadClientTLS(
    caFile: str | None,
    certFile: str | None,
    keyFile: str | None,
    now: datetime.datetime | None = None,
) -> ClientTLS:
    """
    Read and check the TLS files (see the module's doc); a certificate
    file may hold the client certificate followed by its intermediates.

    @raise PoolSettingError: naming the field, the path and what is wrong.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    if (certFile is None) != (keyFile is None):
        given, missing = ("cert_file", "key_file") if certFile else ("key_file", "cert_file")
        raise PoolSettingError(
            given,
            certFile or keyFile,
            f"needs pool.{missing} too (a client certificate and its key)",
        )
    trusted: list[x509.Certificate] = []
    if caFile is not None:
        trusted = _certificates("ca_file", caFile, _read("ca_file", caFile, secret=False))
        for cert in trusted:
            _checkDates("ca_file", caFile, cert, now)
    if certFile is None or keyFile is None:
        return ClientTLS(caFile, trusted)
    chain = _certificates("cert_file", certFile, _read("cert_file", certFile, secret=False))
    _checkDates("cert_file", certFile, chain[0], now)
    keyPEM = readSecretFile("key_file", keyFile)
    key = _privateKey("key_file", keyFile, keyPEM)
    if _publicBytes(key.public_key()) != _publicBytes(chain[0].public_key()):
        raise PoolSettingError(
            "key_file", keyFile, f"not the key of the certificate in pool.cert_file ({certFile})"
        )
    return ClientTLS(caFile, trusted, certFile, chain, keyPEM)
