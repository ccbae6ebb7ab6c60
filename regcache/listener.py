# test-case-name: tests.test_listener,tests.integration.test_settings_proc
"""
The ``--listen`` port: the endpoint parsed before anything else is built,
and a service that listens on it, or says in one line why it cannot and
ends the process.
"""

import re

from OpenSSL import SSL, crypto
from twisted.application.service import Service
from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from regcache.config import ConfigError
from regcache.tls import served_endpoint


def _endpoint_problem(error: Exception) -> str:
    """
    Why serverFromString refused a description, in the operator's words
    rather than the parser's (``invalid literal for int()``).
    """
    text = str(error)
    if isinstance(error, OSError):
        return f"cannot read {error.filename}: {error.strerror}" if error.filename else error.strerror or text
    if isinstance(error, (SSL.Error, crypto.Error)):
        return "the TLS key or certificate is not valid PEM, or they do not match"
    number = re.fullmatch(r"invalid literal for int\(\) with base 10: (.*)", text)
    if number:
        return f"{number.group(1)} is not a number"
    keyword = re.search(r"unexpected keyword argument '(\w+)'", text)
    if keyword:
        return f"unknown parameter {keyword.group(1)!r}"
    return text or type(error).__name__


#: The accept queue a TCP or TLS port asks for unless its description sets
#: ``backlog=`` (the kernel caps it at ``net.core.somaxconn``).  Twisted's
#: default, 50, overflows when many clients connect at once: the kernel then
#: drops the handshake's last ACK, and a client that already sent its
#: request waits on retransmits; 100 of 1,000 clients did (bench/README.md).
BACKLOG = 4096

_QUEUED = ("tcp", "tcp6", "ssl")


def listen_endpoint(reactor, description: str, option: str = "--listen"):
    """
    The server endpoint ``option`` (``--listen``, ``--metrics-listen``)
    describes, and for ``ssl:`` the ServedTLS that SIGHUP reloads (None
    otherwise).  Built before anything else, because building it parses the
    description and reads the TLS key and certificate: whatever goes wrong
    is that option's fault, said with the description as the operator wrote it.
    """
    try:
        kind, _, params = description.partition(":")
        queued = f"{description}:backlog={BACKLOG}" if kind in _QUEUED and "backlog=" not in params else description
        return served_endpoint(reactor, queued, option) or (serverFromString(reactor, queued), None)
    except Exception as e:  # endpoint parsers, plugins' too, raise anything
        raise ConfigError(f"{option}: cannot use {description!r}: {_endpoint_problem(e)}") from None


def _listen_problem(error: BaseException) -> str:
    if isinstance(error, CannotListenError):
        error = error.socketError
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if isinstance(error, OverflowError):  # bind() on a port out of range
        return "the port must be 0-65535"
    return str(error) or type(error).__name__


def _address(address) -> str:
    if hasattr(address, "port"):
        return f"{address.host}:{address.port}"
    name = getattr(address, "name", address)
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


class Listener(Service):
    """
    Serves a factory on the endpoint of ``option`` (``--listen``, or
    ``--metrics-listen`` for a port of /metrics alone).

    Unlike StreamServerEndpointService, which logs a traceback when it
    cannot listen and leaves the process running with no port, this logs
    one line naming the endpoint and ends the process.  Every endpoint
    Twisted ships fails while twistd is still starting the application, so
    a SystemExit from privilegedStartService ends it with status 1 before
    the reactor runs; one that fails later (none of Twisted's do) stops the
    reactor.  "regcache serving" is logged once the port listens.
    """

    log = Logger()

    def __init__(self, endpoint, description: str, factory, reactor, served: str, option: str = "--listen"):
        self.endpoint = endpoint
        self.option = option
        self.description = description
        self.factory = factory
        self.reactor = reactor
        self.served = served
        self._waiting = None
        self._starting = False
        self._refused = False

    def privilegedStartService(self):
        super().privilegedStartService()
        self._starting = True
        self._waiting = self.endpoint.listen(self.factory)
        self._waiting.addCallbacks(self._listening, self._cannot_listen)
        self._starting = False
        if self._refused:
            raise SystemExit(1)

    def startService(self):
        super().startService()
        if self._waiting is None:
            self.privilegedStartService()

    def stopService(self):
        super().stopService()
        self._waiting.cancel()
        return self._waiting.addCallback(lambda port: port and port.stopListening())

    def _listening(self, port):
        self.log.info("regcache serving {listen} on {address}, {served}", listen=self.description,
                      address=_address(port.getHost()), served=self.served)
        return port

    def _cannot_listen(self, failure):
        if failure.check(CancelledError):
            return None
        # Logged rather than printed: twistd has already sent stderr to the
        # log, which is where the operator (or the JSON log pipeline) looks.
        self.log.critical("regcache: {option}: cannot listen on {listen!r}: {problem}", option=self.option,
                          listen=self.description, problem=_listen_problem(failure.value))
        if self._starting:
            self._refused = True
        else:
            self.reactor.stop()
        return None
