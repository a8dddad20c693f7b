"""A TLS front for the emulator on 127.0.0.1: S3 answers over https, moto over plain http.

It terminates TLS with a certificate it makes for itself (self-signed, for IP 127.0.0.1) and
pipes each connection's bytes to moto and back, so a client that verifies against that
certificate (`AWS_CA_BUNDLE`, as an operator behind a TLS-inspecting proxy sets it) talks to
the emulator exactly as it would to S3's https endpoint. A fake for what the emulator lacks;
nothing but loopback is ever reached.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CHUNK = 65536


def self_signed(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) PEM files for IP 127.0.0.1, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "deployer test TLS front")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "front.pem", directory / "front.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@dataclass
class TlsFront:
    url: str  # https://127.0.0.1:PORT
    certificate: Path  # what a client must trust
    connections: int = 0


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(CHUNK):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _serve(client: socket.socket, upstream: tuple[str, int], context: ssl.SSLContext) -> None:
    try:
        tls = context.wrap_socket(client, server_side=True)
    except (OSError, ssl.SSLError):  # a client that refused our certificate: its own error says why
        client.close()
        return
    with tls, socket.create_connection(upstream) as plain:
        back = threading.Thread(target=_pipe, args=(plain, tls), daemon=True)
        back.start()
        _pipe(tls, plain)
        back.join()


@contextlib.contextmanager
def tls_front(upstream_url: str, directory: Path) -> Iterator[TlsFront]:
    """An https endpoint on 127.0.0.1 in front of `upstream_url` (http://127.0.0.1:PORT)."""
    host, _, port = upstream_url.removeprefix("http://").partition(":")
    if host != "127.0.0.1":
        raise ValueError(f"the TLS front fronts loopback only, not {upstream_url}")
    cert_path, key_path = self_signed(directory)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    front = TlsFront(f"https://127.0.0.1:{listener.getsockname()[1]}", cert_path)

    def accept() -> None:
        with contextlib.suppress(OSError):  # closed at the end of the block
            while True:
                client, _ = listener.accept()
                front.connections += 1
                threading.Thread(target=_serve, args=(client, (host, int(port)), context), daemon=True).start()

    threading.Thread(target=accept, name="tls-front", daemon=True).start()
    try:
        yield front
    finally:
        listener.close()
