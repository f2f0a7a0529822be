# -*- test-case-name: tests.test_pool_etcdtls -*-
"""
How this host reaches a secured etcd: the C{pool:} settings for TLS and
etcd's users, checked together and loaded (L{loadEtcdSecurity}).

The rules, each refusal a L{PoolSettingError} naming the field:

* The endpoints are all C{http://} or all C{https://} (a cluster is one or
  the other; a mix would send the credentials in clear to some members).
* C{ca_file}, C{cert_file} and C{key_file} need C{https://} endpoints
  (with C{http://} nothing would use them: a mistake to point out, not to
  ignore). C{https://} without C{ca_file} trusts the system's store, as
  C{etcdctl} does: a member must still show a certificate naming its
  address, signed by a CA the machine trusts.
* C{cert_file} and C{key_file} go together; the key is its owner's alone
  (mode 600), not encrypted, and matches the certificate.
* C{user} and C{password_file} go together, and need C{https://}: over
  C{http://} the password and every token would cross the network in
  clear, and anyone who saw one could act as this host. The password file
  is its owner's alone and holds one line.
* With C{user}, a client certificate must have no Common Name: etcd 3.4's
  gateway refuses every request whose client certificate has one once
  authentication is on (HTTP 400 C{CommonName of client sending a request
  against gateway will be ignored and not used as expected}; checked on
  Debian's 3.4.23).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import attrs

from xenddev.pool.errors import PoolSettingError
from xenddev.pool.etcdauth import EtcdCredentials
from xenddev.pool.etcdtls import ClientTLS, loadClientTLS, readSecretFile

__all__ = ["EtcdSecurity", "loadEtcdSecurity", "readPasswordFile"]


@attrs.frozen
class EtcdSecurity:
    """
    What the etcd client needs beyond the endpoints: its TLS (None: plain
    http) and its credentials (None: no etcd user).
    """

    tls: ClientTLS | None = None
    credentials: EtcdCredentials | None = None


def _scheme(endpoint: str) -> str:
    """The scheme of an endpoint (C{host:port} alone is http)."""
    return endpoint.split("://", 1)[0].lower() if "://" in endpoint else "http"


def readPasswordFile(path: str) -> str:
    """
    The password in C{path}: one line (its newline dropped), the owner's
    alone.

    @raise PoolSettingError: naming C{password_file}.
    """
    data = readSecretFile("password_file", path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PoolSettingError("password_file", path, "not UTF-8 text") from None
    if text.endswith("\n"):
        text = text[:-1]
    text = text.removesuffix("\r")
    if "\n" in text:
        raise PoolSettingError("password_file", path, "holds more than one line")
    if not text:
        raise PoolSettingError("password_file", path, "is empty")
    return text


def loadEtcdSecurity(
    endpoints: Sequence[str],
    *,
    caFile: str | None = None,
    certFile: str | None = None,
    keyFile: str | None = None,
    user: str | None = None,
    passwordFile: str | None = None,
    now: datetime.datetime | None = None,
) -> EtcdSecurity:
    """
    Check the settings together and read their files (see the module's
    doc for the rules).

    @raise PoolSettingError: the first setting that cannot be used.
    """
    schemes = {_scheme(e) for e in endpoints}
    if len(schemes) > 1:
        raise PoolSettingError(
            "endpoints",
            list(endpoints),
            "mixes http:// and https://: the members of one cluster are reached one way",
        )
    https = schemes == {"https"}
    if not https:
        for field, value in (("ca_file", caFile), ("cert_file", certFile), ("key_file", keyFile)):
            if value is not None:
                raise PoolSettingError(
                    field, value, "needs https:// endpoints (with http:// nothing uses it)"
                )
    if user is not None and passwordFile is None:
        raise PoolSettingError("user", user, "needs pool.password_file (the user's password)")
    if passwordFile is not None and user is None:
        raise PoolSettingError("password_file", passwordFile, "needs pool.user (whose password)")
    if user is not None and not https:
        raise PoolSettingError(
            "user",
            user,
            "needs https:// endpoints: over http:// the password and the tokens etcd gives "
            "for it would cross the network in clear",
        )
    tls = loadClientTLS(caFile, certFile, keyFile, now) if https else None
    credentials = None
    if user is not None and passwordFile is not None:
        if tls is not None and tls.clientCommonName is not None:
            raise PoolSettingError(
                "cert_file",
                certFile,
                f"the certificate has a Common Name ({tls.clientCommonName}) and etcd 3.4's "
                "gateway refuses every request with such a client certificate once "
                "authentication is on: issue it without a CN (e.g. subject O=xenddev)",
            )
        credentials = EtcdCredentials(user, readPasswordFile(passwordFile))
    return EtcdSecurity(tls, credentials)
