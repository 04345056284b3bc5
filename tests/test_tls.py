"""TLS and mutual TLS with real certificates made here (cryptography): the right CA and client
certificate connect; a wrong CA, plaintext, or a missing/foreign client certificate do not."""
from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from colgrid_client import Client, ColgridError, UnavailableError
from colgrid_server.errors import FailedPrecondition
from tests.conftest import start_live_server, stop_live_server


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes
    _cert_obj: x509.Certificate
    _key_obj: ec.EllipticCurvePrivateKey

    def write(self, directory: Path, stem: str) -> tuple[str, str]:
        (directory / f"{stem}.crt").write_bytes(self.cert)
        (directory / f"{stem}.key").write_bytes(self.key)
        return str(directory / f"{stem}.crt"), str(directory / f"{stem}.key")


def _pem(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    return Pem(cert.public_bytes(serialization.Encoding.PEM),
               key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()), cert, key)


def make_ca(name: str) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return _pem(cert, key)


def issue(ca: Pem, name: str, *, server: bool) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca._cert_obj.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return _pem(builder.sign(ca._key_obj, hashes.SHA256()), key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, stranger_ca = make_ca("colgrid test server CA"), make_ca("colgrid test client CA"), \
        make_ca("someone else's CA")
    server_cert, server_key = issue(server_ca, "colgrid", server=True).write(directory, "server")
    client = issue(client_ca, "search-frontend", server=False)
    stranger = issue(stranger_ca, "intruder", server=False)
    (directory / "client-ca.crt").write_bytes(client_ca.cert)
    return {"dir": directory, "server_ca": server_ca.cert, "stranger_ca": stranger_ca.cert,
            "server_cert": server_cert, "server_key": server_key,
            "client_ca_file": str(directory / "client-ca.crt"), "client": client, "stranger": stranger}


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, pki):
    server, thread = start_live_server(tmp_path_factory.mktemp("tls-data"), tls_cert=pki["server_cert"],
                                       tls_key=pki["server_key"])
    yield server
    stop_live_server(server, thread)


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory, pki):
    server, thread = start_live_server(tmp_path_factory.mktemp("mtls-data"), tls_cert=pki["server_cert"],
                                       tls_key=pki["server_key"], tls_client_ca=pki["client_ca_file"])
    yield server
    stop_live_server(server, thread)


def test_tls_client_trusting_the_server_ca_connects(tls_server, pki):
    with Client(tls_server.target, root_certificates=pki["server_ca"], retries=0, timeout=10) as client:
        assert client.list_indexes() == []


def test_tls_client_reads_certificates_from_files(tls_server, pki):
    ca_file = pki["dir"] / "server-ca.crt"
    ca_file.write_bytes(pki["server_ca"])
    with Client(tls_server.target, root_certificates=str(ca_file), retries=0, timeout=10) as client:
        assert client.list_indexes() == []


def test_tls_client_trusting_another_ca_cannot_connect(tls_server, pki):
    with Client(tls_server.target, root_certificates=pki["stranger_ca"], retries=0, timeout=5) as client:
        with pytest.raises(UnavailableError):
            client.list_indexes()


def test_plaintext_client_cannot_talk_to_a_tls_server(tls_server):
    with Client(tls_server.target, retries=0, timeout=5) as client, pytest.raises(UnavailableError):
        client.list_indexes()


def test_mutual_tls_client_with_a_certificate_from_the_client_ca_connects(mtls_server, pki):
    client_pem = pki["client"]
    with Client(mtls_server.target, root_certificates=pki["server_ca"], private_key=client_pem.key,
                certificate_chain=client_pem.cert, retries=0, timeout=10) as client:
        assert client.list_indexes() == []


def test_mutual_tls_refuses_a_client_without_a_certificate(mtls_server, pki):
    with Client(mtls_server.target, root_certificates=pki["server_ca"], retries=0, timeout=5) as client:
        with pytest.raises(ColgridError) as info:
            client.list_indexes()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_certificate_from_another_ca(mtls_server, pki):
    stranger = pki["stranger"]
    with Client(mtls_server.target, root_certificates=pki["server_ca"], private_key=stranger.key,
                certificate_chain=stranger.cert, retries=0, timeout=5) as client:
        with pytest.raises(UnavailableError):
            client.list_indexes()


def test_a_missing_certificate_file_stops_the_server_from_starting(tmp_path, pki):
    with pytest.raises(FailedPrecondition, match="tls_cert"):
        start_live_server(tmp_path, tls_cert=str(tmp_path / "absent.crt"), tls_key=pki["server_key"])


def test_client_certificate_needs_its_key(pki):
    with pytest.raises(ValueError, match="private_key and certificate_chain"):
        Client("127.0.0.1:1", root_certificates=pki["server_ca"], certificate_chain=pki["client"].cert)
