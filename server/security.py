"""The coordinator's secrets: its certificate authority and server certificate, enrollment tokens, device
and operator credentials.

    make_tls(folder, hosts)           -> ca.pem, ca.key, server.pem, server.key (keys mode 0600)
    new_secret("dme", token_id)       -> "dme.<id>.<secret>"   an enrollment token
    parse_secret(text, "dme")         -> (id, secret)          ValueError when it is not one
    digest(secret)                    -> what the state keeps: SHA-256 hex, never the secret itself

Device credentials are bearer secrets bound to one device ("dmc.<device id>.<secret>"), checked against
the digest stored with the device; not client certificates, because a certificate cannot be asked for on
the same port before a device has one (grpcio's server either requires client certificates on every call
or never asks), a digest can be revoked by deleting one row, and the agent needs no X.509 code. Mutual TLS
remains an option on top (`tls.client_ca`) for fleets whose provisioning already issues client
certificates. docs/security.md says what each secret protects.

Certificates are valid from 1970-01-02: a Raspberry Pi has no real-time clock and may boot at any date
(1970 or the last shutdown) until NTP answers; a certificate not yet valid by the board's clock would lock
it out. Every other time check (token expiry) runs on the coordinator's clock.
"""
import datetime
import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
from pathlib import Path
from typing import Iterable, Optional, Tuple

NOT_BEFORE = datetime.datetime(1970, 1, 2, tzinfo=datetime.timezone.utc)
CA_DAYS, SERVER_DAYS = 20 * 365, 10 * 365
KINDS = {"dme": "enrollment token", "dmc": "device credential", "dmo": "operator credential"}


def new_secret(kind: str, key: str) -> str:
    """A secret of `kind` ("dme", "dmc", "dmo") naming `key` (a token or device id): 256 random bits."""
    return f"{kind}.{key}.{secrets.token_urlsafe(32)}"


def parse_secret(text: str, kind: str) -> Tuple[str, str]:
    """(key, secret) of a secret of `kind`; ValueError saying what was expected otherwise."""
    parts = (text or "").strip().split(".")
    if len(parts) != 3 or parts[0] != kind or not parts[1] or len(parts[2]) < 32:
        raise ValueError(f"not a {KINDS[kind]}")
    return parts[1], parts[2]


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, stored_digest: Optional[str]) -> bool:
    return stored_digest is not None and hmac.compare_digest(digest(secret), stored_digest)


def write_secret(path, text: str) -> None:
    """Write a secret readable by its owner only (mode 0600 from the start, not chmod after)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def issue_token(store, name: Optional[str] = None, ttl_s: float = 86400.0, uses: Optional[int] = 1,
                now: Optional[float] = None) -> str:
    """A new enrollment token, kept in `store` as its digest: for `name` only (a device token) or for any new
    name (a fleet token); valid `ttl_s` seconds on the coordinator's clock; `uses` enrollments (None: any)."""
    import time

    if uses is not None and uses < 1:
        raise ValueError(f"uses must be at least 1 (or None for any number), got {uses}")
    if ttl_s <= 0:
        raise ValueError(f"a token must be valid for a positive time, got {ttl_s} s")
    token = new_secret("dme", secrets.token_hex(6))
    token_id, secret = parse_secret(token, "dme")
    store.add_token(token_id, digest(secret), name, (time.time() if now is None else now) + ttl_s, uses)
    return token


def default_hosts() -> list:
    return sorted({"localhost", "127.0.0.1", "::1", socket.gethostname()})


def make_tls(folder, hosts: Iterable[str]) -> dict:
    """A new CA and a server certificate for `hosts` (names or IP addresses) in `folder`; keeps an existing
    CA (devices already trust it) and only issues a new server certificate. Returns the four paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in ("ca.pem", "ca.key", "server.pem", "server.key")}
    now = datetime.datetime.now(datetime.timezone.utc)

    def pem_key(key) -> str:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()).decode()

    if paths["ca.pem"].exists() and paths["ca.key"].exists():
        ca_cert = x509.load_pem_x509_certificate(paths["ca.pem"].read_bytes())
        ca_key = serialization.load_pem_private_key(paths["ca.key"].read_bytes(), None)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"deltamask coordinator CA {now:%Y-%m-%d}")])
        ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(NOT_BEFORE)
                   .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                  critical=True)
                   .sign(ca_key, hashes.SHA256()))
        write_secret(paths["ca.key"], pem_key(ca_key))
        paths["ca.pem"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    hosts = list(hosts)
    if not hosts:
        raise ValueError("a server certificate needs at least one host name or address")
    alt = []
    for h in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOT_BEFORE)
            .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    write_secret(paths["server.key"], pem_key(key))
    paths["server.pem"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return {k.replace(".", "_"): str(v) for k, v in paths.items()}


def make_client_cert(folder, name: str) -> dict:
    """A client certificate for `name`, signed by the CA in `folder` (mutual TLS: tls.client_ca = ca.pem):
    folder/clients/<name>.pem and .key (0600). Returns their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    if not (folder / "ca.key").exists():
        raise ValueError(f"no CA in {folder}: run deltamask-server tls first")
    ca_cert = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOT_BEFORE)
            .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"cert": folder / "clients" / f"{name}.pem", "key": folder / "clients" / f"{name}.key"}
    write_secret(paths["key"], key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()).decode())
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return {k: str(v) for k, v in paths.items()}


__all__ = ["default_hosts", "make_client_cert", "digest", "issue_token", "make_tls", "matches", "new_secret", "parse_secret", "write_secret"]
