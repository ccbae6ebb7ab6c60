"""
A bearer-token server like Docker Hub's auth.docker.io, for the bench's
upstream registry.

docker-registry's ``auth: token:`` checks a JWT's issuer, audience (the
service), expiry, and signature against a certificate in its
``rootcertbundle``.  This server signs with an RSA key whose self-signed
certificate is that bundle, and puts the certificate in the token's ``x5c``
header, which distribution verifies against the bundle.  Key and certificate
are generated at run time into the bench's work directory, never committed.

Like Hub for public images, it grants every scope asked, to anyone: the point
is the extra round trip and token per scope that a mirror must handle, not
access control.  ``python -m bench.tokens PORT KEY CERT ISSUER SERVICE``.
"""

import base64
import datetime
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

LIFETIME = 300  # seconds, as Docker Hub's tokens


def make_key_and_cert(key_path: str, cert_path: str, name: str = "regcache-bench-token") -> None:
    """A fresh RSA key and a self-signed certificate for it, as PEM files."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Signer:
    def __init__(self, key_path: str, cert_path: str, issuer: str, service: str):
        with open(key_path, "rb") as f:
            self.key = serialization.load_pem_private_key(f.read(), None)
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        self.x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self.issuer = issuer
        self.service = service

    def token(self, scopes) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind and name:
                access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": self.issuer, "sub": "", "aud": self.service, "exp": now + LIFETIME,
                  "nbf": now - 1, "iat": now, "jti": _b64(os.urandom(12)), "access": access}
        signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64(signature)


def serve(port: int, signer: Signer) -> None:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            url = urlsplit(self.path)
            if url.path != "/token":
                self.send_error(404)
                return
            token = signer.token(parse_qs(url.query).get("scope", []))
            body = json.dumps({"token": token, "access_token": token, "expires_in": LIFETIME,
                               "issued_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    port, key, cert, issuer, service = sys.argv[1:6]
    serve(int(port), Signer(key, cert, issuer, service))
