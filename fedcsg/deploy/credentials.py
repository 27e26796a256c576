"""TLS certificates (a CA, the SuperLink's and each SuperNode's) and SuperNode authentication keys.

Secure by default
-----------------
The SuperLink serves its Fleet, Control and Runtime APIs over HTTPS on one port (Flower 1.41) with
a server certificate signed by a CA made here, and accepts only the SuperNodes whose public keys
were registered with ``flwr supernode register`` (``--enable-supernode-auth``). Flower's SuperNode
does not present a TLS client certificate (no mTLS on the Fleet API): its identity is its EC P-384
key pair, and every Fleet request is signed with the private key. The per-node certificates made
here serve the SuperNode's *own* Runtime API, which the ClientApp processes on the device connect
to. ``insecure=True`` turns all of this off; it is never a default and always prints a loud warning.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedcsg.spec.checks import shown

MAX_NODES = 10_000  # SuperNode certificates or key pairs one command makes: a fleet far larger than one machine runs
MAX_DAYS = 36500  # a certificate's validity: 100 years at most (X.509 dates end in 9999)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a test federation's public-key infrastructure.

    Attributes
    ----------
    ca_cert, ca_key
        The certificate authority. ``ca_cert`` is what every party trusts (``--ssl-ca-certfile`` on
        the SuperLink, ``--root-certificates`` on SuperNodes, ``root-certificates`` in ``flwr``'s
        connection entry); ``ca_key`` signs the other certificates and should leave this machine
        never.
    server_cert, server_key
        The SuperLink's certificate (serverAuth; SANs: the given hosts) and key.
    node_certs
        ``(cert, key)`` per SuperNode (serverAuth and clientAuth; SANs 127.0.0.1 and localhost),
        for the SuperNode's own Runtime API on the device.
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_certs: tuple[tuple[Path, Path], ...] = ()

    @classmethod
    def in_dir(cls, directory: str | Path, nodes: int = 0) -> TlsFiles:
        d = Path(directory)
        return cls(
            d / "ca.crt",
            d / "ca.key",
            d / "server.crt",
            d / "server.key",
            tuple((d / f"node-{i}.crt", d / f"node-{i}.key") for i in range(nodes)),
        )

    def check(self) -> None:
        """Raise FileNotFoundError naming the first missing file."""
        for path in (self.ca_cert, self.server_cert, self.server_key, *(p for pair in self.node_certs for p in pair)):
            if not path.is_file():
                raise FileNotFoundError(f"TLS file {str(path)!r} does not exist (make it with `fedcsg deploy certs`)")


def check_nodes(count: int, minimum: int) -> None:
    """A one-line ValueError unless ``minimum <= count <=`` :data:`MAX_NODES`."""
    if not minimum <= count <= MAX_NODES:
        raise ValueError(f"nodes = {count:,} is not accepted: an integer in {minimum}..{MAX_NODES:,} is")


def _write_private(path: Path, data: bytes) -> None:
    # Private keys are mode 0600 before a byte of them is written, never readable by others even
    # briefly: os.open applies its mode only when it creates the file, so an existing file (an
    # --overwrite of a key someone made 0644) is set to 0600 on its open handle first.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(data)


def _san(hosts: Iterable[str]) -> list:
    from cryptography import x509

    names: list = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_certificates(
    out_dir: str | Path,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    nodes: int = 0,
    days: int = 365,
    overwrite: bool = False,
) -> TlsFiles:
    """Make a CA, a SuperLink certificate for ``hosts`` and ``nodes`` SuperNode certificates.

    Parameters
    ----------
    out_dir
        Directory for ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key`` and
        ``node-I.crt`` / ``node-I.key``. Keys are written with mode 0600.
    hosts
        Names and IP addresses under which SuperNodes and ``flwr`` reach the SuperLink (the
        certificate's subject alternative names; TLS checks the address against them).
    nodes
        Number of SuperNode certificates.
    days
        Validity.
    overwrite
        Replace existing files (otherwise an existing ``ca.crt`` is an error: a new CA would
        silently invalidate every certificate already handed out).

    Returns
    -------
    TlsFiles
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ValueError("make_certificates needs at least one host name or IP address for the SuperLink")
    for host in hosts:
        bad = not host.strip() or host != host.strip() or any(c in host for c in " /,")
        if bad or not host.isascii() or not host.isprintable():  # a newline would enter the subjectAltName
            raise ValueError(f"host {shown(host)} is not accepted: a DNS name or an IP address (printable ASCII) is")
    check_nodes(nodes, minimum=0)
    if not 0 < days <= MAX_DAYS:
        raise ValueError(f"days = {days} is not accepted: an integer in 1..{MAX_DAYS} is")
    files = TlsFiles.in_dir(out_dir, nodes)
    if files.ca_cert.exists() and not overwrite:
        raise FileExistsError(f"{str(files.ca_cert)!r} exists; pass overwrite (--overwrite) to make a new CA")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    # Backdate a little: a device whose clock lags would otherwise reject a certificate made just now.
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)
    pem = serialization.Encoding.PEM
    key_format = (serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedcsg test federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(files.ca_key, ca_key.private_bytes(pem, *key_format))
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))

    def leaf(common_name: str, names: Sequence[str], usages: list, cert_path: Path, key_path: Path) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, True, False, False, False, False), critical=True
            )  # digitalSignature, keyAgreement (ECDHE)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(_san(names)), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(key_path, key.private_bytes(pem, *key_format))
        cert_path.write_bytes(cert.public_bytes(pem))

    leaf("fedcsg superlink", hosts, [ExtendedKeyUsageOID.SERVER_AUTH], files.server_cert, files.server_key)
    for i, (cert_path, key_path) in enumerate(files.node_certs):
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        leaf(f"fedcsg supernode {i}", ("127.0.0.1", "localhost"), usages, cert_path, key_path)
    return files


# --------------------------------------------------------------------------------- SuperNode keys


@dataclass(frozen=True)
class NodeKey:
    """One SuperNode's authentication key pair (EC P-384, OpenSSH format, as Flower 1.41 reads them)."""

    private: Path
    public: Path


def node_keys_in(directory: str | Path, count: int) -> list[NodeKey]:
    d = Path(directory)
    return [NodeKey(d / f"node-{i}.key", d / f"node-{i}.key.pub") for i in range(count)]


def make_node_keys(out_dir: str | Path, count: int, overwrite: bool = False) -> list[NodeKey]:
    """Write ``count`` SuperNode key pairs ``node-I.key`` (0600) / ``node-I.key.pub``.

    The SuperLink accepts a SuperNode only after its ``.pub`` file was registered
    (:func:`register_nodes`); the SuperNode signs its requests with the private key
    (``flower-supernode --auth-supernode-private-key``).
    """
    check_nodes(count, minimum=1)
    keys = node_keys_in(out_dir, count)
    existing = [k.private for k in keys if k.private.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{str(existing[0])!r} exists; pass overwrite (--overwrite) to replace the node keys")
    for i, key in enumerate(keys):
        write_node_key(key, f"fedcsg-node-{i}")
    return keys


def write_node_key(key: NodeKey, comment: str) -> NodeKey:
    """Write a new EC P-384 key pair to ``key``'s files (the private half 0600, OpenSSH format, as
    ``ssh-keygen -t ecdsa -b 384`` writes it; ``comment`` ends the public line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        key.private,
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    key.public.write_bytes(public + f" {comment}\n".encode())
    return key
