"""TLS certificates for the SuperLink and authentication keys for SuperNodes.

- A self-signed CA, and a SuperLink certificate signed by it whose subject alternative
  names are the host names / IP addresses SuperNodes dial (`--ssl-*` on the SuperLink,
  `--root-certificates` on each SuperNode and in the `flwr` connection).
- One ECDSA P-384 key pair per SuperNode in OpenSSH format, as Flower's node
  authentication expects: the private key stays on the device
  (`--auth-supernode-private-key`), the public key is registered on the SuperLink with
  `flwr supernode register`.

Usage: python -m deploy.credentials --out DIR --hosts 127.0.0.1,localhost --nodes 3
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of a SuperLink's TLS setup."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKey:
    """One SuperNode's key pair (OpenSSH format)."""

    private_key: Path
    public_key: Path


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _subject_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def write_tls_certificates(out_dir: Path, hosts: list[str]) -> TlsFiles:
    """Write ca.crt, server.pem and server.key under `out_dir`; the server certificate is
    valid for each of `hosts` (IP addresses or DNS names)."""
    if not hosts:
        raise ValueError("hosts: give at least one host name or IP address the SuperLink is reached at")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmoe CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(_subject_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(out_dir / "ca.key", _key_pem(ca_key), private=True)
    return TlsFiles(
        ca_cert=_write(out_dir / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM)),
        server_cert=_write(out_dir / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM)),
        server_key=_write(out_dir / "server.key", _key_pem(server_key), private=True),
    )


def write_node_key(out_dir: Path, name: str) -> NodeKey:
    """Write `<name>` (private) and `<name>.pub` (public), an ECDSA P-384 pair in OpenSSH format."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return NodeKey(
        private_key=_write(out_dir / name, private, private=True),
        public_key=_write(out_dir / f"{name}.pub", public + f" {name}\n".encode()),
    )


def main(argv: list[str] | None = None) -> None:
    """Command line: write the CA, the SuperLink certificate and N node key pairs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write into")
    parser.add_argument("--hosts", default="127.0.0.1,localhost",
                        help="comma-separated IPs / DNS names the SuperLink is reached at")
    parser.add_argument("--nodes", type=int, default=0, help="how many SuperNode key pairs (node-0, node-1, ...)")
    args = parser.parse_args(argv)
    tls = write_tls_certificates(args.out, [h.strip() for h in args.hosts.split(",") if h.strip()])
    print(f"CA: {tls.ca_cert}\nSuperLink certificate: {tls.server_cert} (key {tls.server_key})")
    for i in range(args.nodes):
        key = write_node_key(args.out / "nodes", f"node-{i}")
        print(f"SuperNode key: {key.private_key} (register {key.public_key})")


if __name__ == "__main__":
    main()
