# test-case-name: tests.test_tls,tests.integration.test_tls_proc
"""
TLS on both sides: the ``--listen ssl:…`` port regcache serves, and how it
checks the upstreams it fetches from.

Served: Twisted's own ``ssl:`` endpoint would accept TLS 1.0 and CBC-SHA1
suites and read its key once.  regcache builds that endpoint itself from the
same description, with TLS 1.2 as the floor, AEAD suites only, and a
certificate that SIGHUP re-reads: every new connection takes the context
loaded last, one already open keeps the one it began with, and a bad pair
leaves the old one in place (the reloader raises; regcache.reload logs and
counts it).

Upstream: certificates are verified as a browser would (service-identity,
the system's trust store), or against the operator's private CA; not at all
only when the operator asked for exactly that.
"""

from typing import Callable, Dict, List, Optional, Tuple

from OpenSSL import SSL
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import (
    AcceptableCiphers, Certificate, CertificateOptions, KeyPair, TLSVersion,
    trustRootFromCertificates,
)
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from regcache.config import ConfigError

#: The oldest protocol either side speaks: TLS 1.0 and 1.1 are deprecated (RFC 8996).
MINIMUM = TLSVersion.TLSv1_2

#: TLS 1.2 suites with forward secrecy and an AEAD cipher; TLS 1.3's own are all of that already.
CIPHERS = AcceptableCiphers.fromOpenSSLCipherString("ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!MD5:!DSS")

#: What ``ssl:`` takes here, with Twisted's defaults.  Twisted's ``sslmethod``
#: and ``dhParameters`` are refused: the first would undo the floor, the
#: second only enables DHE suites, which CIPHERS leaves out.
_SSL_PARAMETERS = {"privateKey": "server.pem", "certKey": None, "extraCertChain": None, "interface": "",
                   "backlog": "50"}


def split_description(description: str) -> Tuple[List[str], Dict[str, str]]:
    """
    An endpoint description's positional and keyword parts, with
    Twisted's escapes (``\\:`` for a colon, ``\\=`` for an equals sign).
    """
    fields: List[str] = [""]
    escaped = False
    for ch in description:
        if escaped:
            fields[-1] += "\\" + ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            fields.append("")
        else:
            fields[-1] += ch
    args: List[str] = []
    kwargs: Dict[str, str] = {}
    for field in fields:
        key, sep, value = _unescaped_split(field)
        if sep:
            kwargs[_unescape(key)] = _unescape(value)
        else:
            args.append(_unescape(field))
    return args, kwargs


def _unescaped_split(field: str) -> Tuple[str, bool, str]:
    i = 0
    while i < len(field):
        if field[i] == "\\":
            i += 2
            continue
        if field[i] == "=":
            return field[:i], True, field[i + 1:]
        i += 1
    return field, False, ""


def _unescape(text: str) -> str:
    out, escaped = [], False
    for ch in text:
        if escaped or ch != "\\":
            out.append(ch)
            escaped = False
        else:
            escaped = True
    return "".join(out)


def server_options(key_pem: bytes, cert_pem: bytes, chain_pem: Optional[bytes] = None) -> CertificateOptions:
    """
    The served side's options for one key and certificate (and the
    intermediates that lead to its CA).  Raises SSL.Error or crypto.Error
    when they are not PEM or do not match.
    """
    chain = [Certificate.loadPEM(c).original for c in _pem_blocks(chain_pem)] if chain_pem else []
    options = CertificateOptions(
        privateKey=KeyPair.load(key_pem, SSL.FILETYPE_PEM).original, certificate=Certificate.loadPEM(cert_pem).original,
        extraCertChain=chain,
        raiseMinimumTo=MINIMUM, acceptableCiphers=CIPHERS,
    )
    options.getContext()  # checks that key and certificate match, now rather than at the first client
    return options


def _pem_blocks(data: bytes) -> List[bytes]:
    end = b"-----END CERTIFICATE-----"
    return [block + end for block in data.split(end) if b"-----BEGIN CERTIFICATE-----" in block]


@implementer(IOpenSSLServerConnectionCreator)
class ServedTLS:
    """
    The served port's key and certificate, read from files; ``reload``
    reads them again and swaps them in for the connections that follow.
    """

    def __init__(self, key_path: str, cert_path: str, chain_path: Optional[str] = None, option: str = "--listen"):
        self.option = option
        self.key_path = key_path
        self.cert_path = cert_path
        self.chain_path = chain_path
        self._options = server_options(*self._read())

    def _read(self) -> Tuple[bytes, bytes, Optional[bytes]]:
        paths = [self.key_path, self.cert_path] + ([self.chain_path] if self.chain_path else [])
        contents = []
        for path in paths:
            with open(path, "rb") as f:
                contents.append(f.read())
        return contents[0], contents[1], contents[2] if self.chain_path else None

    def serverConnectionForTLS(self, protocol):
        return SSL.Connection(self._options.getContext(), None)

    def reloader(self, run: Callable) -> Callable:
        """
        The SIGHUP reloader: read the files off the reactor (``run``), and
        swap the new pair in only if it is a valid, matching one.
        """

        async def reload():
            try:
                read = await run(self._read)
                options = server_options(*read)
            except OSError as e:
                raise ConfigError(f"{self.option}: cannot read {e.filename}: {e.strerror}") from None
            except Exception:  # SSL.Error, crypto.Error, ValueError: what OpenSSL makes of bad PEM
                raise ConfigError(f"{self.option}: the new TLS key or certificate is not valid PEM, or they "
                                  "do not match") from None
            self._options = options

        return reload


def served_endpoint(reactor, description: str, option: str = "--listen"):
    """
    The endpoint of an ``ssl:`` description and its ServedTLS, or None
    for any other kind, which Twisted's own parsers serve as they are.
    """
    args, kwargs = split_description(description)
    if not args or args[0] != "ssl":
        return None
    if len(args) != 2:
        raise ValueError("ssl: takes one port, then name=value parameters")
    unknown = sorted(set(kwargs) - set(_SSL_PARAMETERS))
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r} (regcache sets the TLS versions and ciphers itself)")
    given = dict(_SSL_PARAMETERS, **kwargs)
    tls = ServedTLS(given["privateKey"], given["certKey"] or given["privateKey"], given["extraCertChain"], option)
    endpoint = SSL4ServerEndpoint(reactor, int(args[1]), tls, backlog=int(given["backlog"]),
                                  interface=given["interface"])
    return endpoint, tls


@implementer(IPolicyForHTTPS)
class _Unverified:
    """Encryption without authentication: only for ``--upstream-insecure``."""

    def __init__(self):
        self._options = CertificateOptions(verify=False, raiseMinimumTo=MINIMUM)

    def creatorForNetloc(self, hostname, port):
        return self._options


def upstream_policy(ca_pem: Optional[bytes] = None, insecure: bool = False):
    """
    How an upstream's certificates are checked: against the system's
    trust store, or against the certificates of ``ca_pem`` (a private CA)
    alone, or (``insecure``) not at all.
    """
    if insecure:
        return _Unverified()
    if ca_pem is None:
        return BrowserLikePolicyForHTTPS()
    return BrowserLikePolicyForHTTPS(trustRoot=trustRootFromCertificates(
        [Certificate.loadPEM(block) for block in _pem_blocks(ca_pem)]))
