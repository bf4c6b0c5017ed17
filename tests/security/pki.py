"""A throw-away PKI for the security tests, made with the `cryptography` package.

One trusted CA signs a server certificate (for 127.0.0.1 / localhost: Kafka's SASL_SSL listener,
Redis' TLS port, the gateway's HTTPS and gRPC) and a client certificate (mTLS); a second CA that
nobody trusts stands for "a certificate from the wrong authority". Files are PEM in one folder.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    folder: Path
    ca: Path  # the trusted CA certificate
    rogue_ca: Path  # a CA that signed nothing we serve: trusting only it must fail verification
    server_cert: Path
    server_key: Path  # unencrypted PKCS#8
    server_keystore: Path  # key + certificate chain in one PEM (Kafka's ssl.keystore.type=PEM)
    client_cert: Path
    client_key: Path  # unencrypted PKCS#8
    client_key_encrypted: Path  # the same key, encrypted with `client_key_password`
    client_key_password: str
    rogue_client_cert: Path  # signed by the rogue CA
    rogue_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "banditgate tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(common_name: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
          server: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server \
        else [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _pem_key(key: ec.EllipticCurvePrivateKey, password: str | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_pki(folder: Path, client_key_password: str = "client-key-pass") -> Pki:
    """Write every certificate and key into `folder` (created) and return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("banditgate test CA")
    rogue_key, rogue_cert = _ca("somebody else's CA")
    server_key, server_cert = _leaf("127.0.0.1", ca_key, ca_cert, server=True)
    client_key, client_cert = _leaf("banditgate-client", ca_key, ca_cert, server=False)
    rogue_client_key, rogue_client_cert = _leaf("intruder", rogue_key, rogue_cert, server=False)

    def write(name: str, data: bytes) -> Path:
        path = folder / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    return Pki(
        folder=folder,
        ca=write("ca.pem", _pem_cert(ca_cert)),
        rogue_ca=write("rogue-ca.pem", _pem_cert(rogue_cert)),
        server_cert=write("server.pem", _pem_cert(server_cert) + _pem_cert(ca_cert)),
        server_key=write("server.key", _pem_key(server_key)),
        server_keystore=write("server-keystore.pem", _pem_key(server_key) + _pem_cert(server_cert) + _pem_cert(ca_cert)),
        client_cert=write("client.pem", _pem_cert(client_cert)),
        client_key=write("client.key", _pem_key(client_key)),
        client_key_encrypted=write("client-encrypted.key", _pem_key(client_key, client_key_password)),
        client_key_password=client_key_password,
        rogue_client_cert=write("rogue-client.pem", _pem_cert(rogue_client_cert)),
        rogue_client_key=write("rogue-client.key", _pem_key(rogue_client_key)),
    )
