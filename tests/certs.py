"""
A certificate authority made on the fly with ``cryptography``, and server
certificates it signs, as PEM files: what the TLS tests serve and trust.
"""

import datetime
import ipaddress
import os
from typing import Sequence, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CA:
    """A self-signed CA whose ``issue`` writes a key and certificate for the names given."""

    def __init__(self, directory: str, name: str = "regcache test CA"):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.certificate = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        #: A directory holding the CA certificate alone: skopeo's ``--src-cert-dir``.
        self.trust_dir = os.path.join(directory, "trust")
        os.makedirs(self.trust_dir, exist_ok=True)
        self.path = os.path.join(self.trust_dir, "ca.crt")
        with open(self.path, "wb") as f:
            f.write(self.pem)

    def issue(self, stem: str, names: Sequence[str] = ("127.0.0.1", "localhost")) -> Tuple[str, str]:
        """(key path, certificate path) of a new server certificate for ``names`` (IPs or DNS names)."""
        key = ec.generate_private_key(ec.SECP256R1())
        alternatives = []
        for name in names:
            try:
                alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alternatives.append(x509.DNSName(name))
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{stem} {names[0]}")]))
            .issuer_name(self.certificate.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        key_path = os.path.join(self.directory, f"{stem}.key")
        cert_path = os.path.join(self.directory, f"{stem}.crt")
        with open(key_path, "wb") as f:
            f.write(_pem_key(key))
        with open(cert_path, "wb") as f:
            f.write(certificate.public_bytes(serialization.Encoding.PEM))
        return key_path, cert_path


def serial_of(cert_path: str) -> int:
    """The serial number of the certificate in a PEM file."""
    with open(cert_path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read()).serial_number
