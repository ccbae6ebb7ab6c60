# test-case-name: tests.integration.test_tls_proc
"""
TLS served directly by a real regcache (``--listen ssl:…``) with a CA made
on the fly: skopeo and containerd pull through it verifying the
certificate, a TLS 1.1 client is refused, and after SIGHUP a new connection
sees the new certificate while a bad pair keeps the old one.
"""

import shutil
import signal
import socket
import ssl

import pytest

from cryptography import x509

from tests.certs import serial_of
from tests.integration.clients import Containerd, dir_digests, expected_files, skopeo_pull
from tests.integration.procs import Regcache, wait_for


@pytest.fixture
def served(tmp_path, hub, ca):
    """A regcache serving TLS with a certificate ``ca`` signed, in front of the fake Hub."""
    key, cert = ca.issue("server")
    password = tmp_path / "password"
    password.write_text("s3cret-token\n")
    rc = Regcache(str(tmp_path / "store"), hub.registry_url, ["--username", "ci", "--password-file", str(password),
                                                               "--client-header-timeout", "2s"], ca=ca.path)
    rc.listen = f"ssl:{rc.port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    rc.key, rc.cert = key, cert
    with rc:
        yield rc


def client_hello() -> bytes:
    """The bytes a TLS client sends first, made by a real TLS client into a memory BIO."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def served_serial(rc) -> int:
    """The serial number of the certificate a new verified connection to ``rc`` is shown."""
    with socket.create_connection(("127.0.0.1", rc.port), timeout=10) as raw:
        with rc.context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def test_skopeo_pulls_over_verified_tls(served, ca, images, tmp_path):
    """skopeo, trusting only the test CA (``--src-cert-dir``), pulls exact bytes over TLS."""
    r = skopeo_pull(f"{served.host}/library/small:1", str(tmp_path / "a"), cert_dir=ca.trust_dir)
    assert r.returncode == 0, r.stderr
    assert dir_digests(str(tmp_path / "a")) == expected_files(images["library/small:1"])


def test_containerd_pulls_with_hosts_toml_ca(served, ca):
    """containerd, its hosts.toml naming the test CA, pulls through the TLS port."""
    ctd = Containerd().start()
    try:
        ctd.mirror("docker.io", served.host, ca=ca.path)
        r = ctd.pull("docker.io/library/small:1")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "docker.io/library/small:1" in ctd.images()
    finally:
        ctd.stop()


def test_tls11_client_is_refused(served):
    """A client that speaks at most TLS 1.1 gets no session; a TLS 1.2 client does, at the same port."""
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            old.wrap_socket(raw, server_hostname="127.0.0.1")
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as raw:
        with served.context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_sighup_serves_new_certificate_and_keeps_old_on_a_bad_pair(served, ca):
    """
    After the files are replaced and SIGHUP sent, a new connection sees the
    new certificate; after a mismatched pair and SIGHUP, it still sees that
    one, and the log and metrics say the reload failed.
    """
    assert served_serial(served) == serial_of(served.cert)
    key, cert = ca.issue("renewed")
    shutil.copy(key, served.key)
    shutil.copy(cert, served.cert)
    renewed = serial_of(cert)
    served.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: served_serial(served) == renewed)
    wait_for(lambda: 'regcache_reloads_total{result="ok",what="tls"} 1.0' in served.get("/metrics")[2].decode())

    stray_key, _ = ca.issue("stray")
    shutil.copy(stray_key, served.key)
    served.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: 'regcache_reloads_total{result="failed",what="tls"} 1.0' in served.get("/metrics")[2].decode())
    assert served_serial(served) == renewed
    assert "Reloading tls failed, keeping the old one: --listen: the new TLS key or certificate" in served.log()


def test_a_handshake_sent_a_byte_at_a_time_is_cut_at_the_header_deadline(served):
    """
    The handshake's bytes never reach the HTTP layer, whose idle timer
    they would otherwise not touch: a ClientHello dripped a byte every
    half second is cut by the header deadline (2 s here) long before it is
    whole, and the cut is counted.
    """
    hello = client_hello()
    sent = 0
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as s:
        try:
            for byte in hello:
                s.sendall(bytes([byte]))
                sent += 1
                s.settimeout(0.5)
                try:
                    if s.recv(1) == b"":
                        break
                except socket.timeout:
                    continue
        except ConnectionError:
            pass
    assert sent < len(hello) // 2, f"{sent} of {len(hello)} ClientHello bytes were taken"
    wait_for(lambda: 'regcache_client_limits_total{limit="head_timeout"} 1.0' in served.get("/metrics")[2].decode())
