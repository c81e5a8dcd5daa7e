"""TLS certificates and SuperNode authentication keys for a Flower deployment.

    python -m deploy.certs OUT_DIR [--hosts localhost 127.0.0.1] [--supernodes N]

writes
    ca.crt, ca.key            a self-signed certificate authority (10 years)
    server.crt, server.key    the SuperLink's certificate, signed by the CA, with
                              the given host names / IPs as subject alternative names
    supernode-K, supernode-K.pub
                              an ECDSA P-384 key pair per SuperNode in OpenSSH
                              format, the form Flower's SuperNode authentication
                              reads (`--auth-supernode-private-key`,
                              `flwr supernode register`)

SuperNodes verify the SuperLink with ca.crt (`--root-certificates`). Private keys are
written readable by the owner only. For production, use your organisation's CA.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

VALID_DAYS = 3650


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_tls_certificates(out_dir: str | Path, hosts: list[str]) -> dict[str, Path]:
    """A CA and a SuperLink certificate for `hosts`; returns the paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsemcom CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                            crl_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))

    paths = {name: out / name for name in ("ca.crt", "ca.key", "server.crt", "server.key")}
    _write(paths["ca.crt"], ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths["ca.key"], _key_pem(ca_key), private=True)
    _write(paths["server.crt"], cert.public_bytes(serialization.Encoding.PEM))
    _write(paths["server.key"], _key_pem(key), private=True)
    return paths


def make_supernode_keys(out_dir: str | Path, index: int) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair (OpenSSH format) for SuperNode `index`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = out / f"supernode-{index}", out / f"supernode-{index}.pub"
    _write(private, key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()), private=True)
    _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH))
    return private, public


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.certs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--hosts", nargs="+", default=["localhost", "127.0.0.1"],
                        help="names and IPs the SuperNodes use to reach the SuperLink")
    parser.add_argument("--supernodes", type=int, default=0,
                        help="also make this many SuperNode authentication key pairs")
    args = parser.parse_args(argv)
    for path in make_tls_certificates(args.out_dir, args.hosts).values():
        print(path)
    for k in range(args.supernodes):
        print(*make_supernode_keys(args.out_dir, k))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
