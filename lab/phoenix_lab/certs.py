"""Certificates and keys for the lab control plane, made with `cryptography` (no openssl CLI).

A throwaway CA signs the apiserver's serving cert and the client certs of the admin
(group system:masters), the control-plane components and each kubelet
(``system:node:<name>``, group ``system:nodes``, as the Node authorizer expects); the
service-account key pair signs tokens. Files are written once per state dir and reused by later `up` calls.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True)
class PKI:
    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"


def _write_key(path: Path, key) -> None:
    path.touch(mode=0o600)
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _issue(pki: PKI, name: str, cn: str, org: str | None, server: bool,
           server_ips: tuple[str, ...] = (), dns_names: tuple[str, ...] | None = None) -> None:
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn, org))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
    )
    if server:
        if dns_names is None:
            dns_names = ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc")
        builder = builder.add_extension(x509.SubjectAlternativeName([
            *(x509.DNSName(name) for name in dns_names),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips),
        ]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(pki.key(name), key)
    pki.cert(name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def ensure_client_cert(pki: PKI, name: str, cn: str, org: str | None = None) -> PKI:
    """A client certificate for one more identity (a kubelet's ``system:node:<name>``)."""
    if not pki.cert(name).exists():
        _issue(pki, name, cn, org, server=False)
    return pki


# Client identities of the control plane: file name -> (user, group).
CLIENTS = {
    "admin": ("phoenix-lab-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", None),
    "scheduler": ("system:kube-scheduler", None),
    "coredns": ("system:phoenix-lab-coredns", None),
    # The apiserver's identity towards kubelets (logs, exec): full kubelet API access.
    "apiserver-kubelet-client": ("kube-apiserver-kubelet-client", "system:masters"),
}


def subject_alt_names(cert_file: Path) -> tuple[set[str], set[str]]:
    """The DNS names and IP addresses a certificate's SubjectAlternativeName lists."""
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    return (set(san.get_values_for_type(x509.DNSName)),
            {str(ip) for ip in san.get_values_for_type(x509.IPAddress)})


def ensure_server_cert(pki: PKI, name: str, dns_names: tuple[str, ...],
                       server_ips: tuple[str, ...] = ()) -> PKI:
    """A serving certificate for another lab server (an S3 server: ``localhost`` and a
    wildcard for its virtual-hosted bucket names), besides 127.0.0.1 and ``server_ips``.
    Issued again when a kept one lacks a wanted name: a lab state dir outlives the address
    a server was first given (the storage tests' loopback server, the lab's host IP)."""
    path = pki.cert(name)
    if path.exists():
        dns, ips = subject_alt_names(path)
        if set(dns_names) <= dns and {"127.0.0.1", *server_ips} <= ips:
            return pki
    _issue(pki, name, dns_names[0], None, True, server_ips, dns_names)
    return pki


def ensure_ca(directory: Path) -> PKI:
    """Only the lab CA under `directory` (made unless present)."""
    pki = PKI(Path(directory))
    pki.dir.mkdir(parents=True, exist_ok=True)
    if not pki.ca_cert.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name("phoenix-lab-ca")).issuer_name(_name("phoenix-lab-ca"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256())
        )
        _write_key(pki.ca_key, key)
        pki.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pki


def ensure_pki(directory: Path, server_ips: tuple[str, ...] = ()) -> PKI:
    """Create the CA, serving/client certs and SA keys under `directory` unless present.

    ``server_ips``: addresses besides 127.0.0.1 the apiserver's certificate must name.
    """
    pki = ensure_ca(directory)
    if not pki.cert("apiserver").exists():
        _issue(pki, "apiserver", "kube-apiserver", None, True, server_ips)
    for name, (cn, org) in CLIENTS.items():
        ensure_client_cert(pki, name, cn, org)
    if not pki.sa_key.exists():
        sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_key(pki.sa_key, sa)
        pki.sa_pub.write_bytes(sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return pki
