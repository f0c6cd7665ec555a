"""The fleet's certificate authority: broker access is per device, by TLS client certificate.

Layout (``edgefleet-hub ca init DIR``)::

    DIR/                    mode 0755: the broker reads ca.crt and crl.pem from here
        ca.crt              the CA certificate (0644): devices, the hub and the broker trust it
        crl.pem             the certificate revocation list (0644): mosquitto's ``crlfile``
        private/            mode 0700
            ca.key          the CA's ECDSA P-256 key, PKCS#8 PEM (0600)
            index.json      every certificate issued: serial, name, role, validity, revocation
            .lock           serialises changes (flock)
            hub/            the hub's client certificate and key (``edgefleet-hub.crt``/``.key``)

Every key is ECDSA P-256: OpenSSL (mosquitto, paho through Python's ssl) accepts it for
TLS 1.2 and 1.3 client and server authentication everywhere, where Ed25519 certificates
need TLS 1.3 on both ends and are refused by many embedded TLS stacks.

Three roles, told apart by the extended key usage, so a certificate cannot stand in for
another kind:

- ``device``: CN = the device id, clientAuth only. mosquitto's ``use_identity_as_username``
  makes the CN the MQTT username, and the ACL patterns on ``%u`` confine the device to its
  own topics.
- ``hub``: CN = the hub's account name (``edgefleet-hub``), clientAuth only.
- ``server``: the broker's certificate, CN = its first name and every name as a
  subjectAltName, serverAuth only. OpenSSL checks the ``ssl_client`` purpose of a client
  certificate, so the broker's own certificate is refused as a client one.

A name belongs to one role: a device cannot be enrolled under the hub's account name.

The CRL is signed with ``next_update`` ``crl_days`` ahead (default one year). OpenSSL
refuses *every* client certificate once the CRL has expired, so it is re-signed on every
revocation and by ``refresh_crl``; run that (``edgefleet-hub ca crl``) well before
``CertificateAuthority.crl_expires_at``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import os
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from contract.topics import device_id_problem
from hub.errors import CAError, EnrollmentError
from hub.keys import write_atomic

CA_CERT = "ca.crt"
CRL_FILE = "crl.pem"
PRIVATE_DIR = "private"
CA_KEY = "ca.key"
INDEX_FILE = "index.json"
LOCK_FILE = ".lock"

DEFAULT_CA_NAME = "edgefleet fleet CA"
DEFAULT_ORGANIZATION = "edgefleet"
DEFAULT_HUB_NAME = "edgefleet-hub"
"""The CN of the hub's client certificate and its account in the broker ACL."""
DEFAULT_CA_DAYS = 3650
DEFAULT_DEVICE_DAYS = 825
DEFAULT_SERVER_DAYS = 825
DEFAULT_CRL_DAYS = 365
BACKDATE_S = 300.0
"""Certificates and CRLs start this much in the past, for clocks a little behind."""
MAX_NAME_LENGTH = 64
"""An X.509 commonName holds at most 64 characters (RFC 5280 ub-common-name)."""


class Role(StrEnum):
    DEVICE = "device"
    HUB = "hub"
    SERVER = "server"


@dataclass(frozen=True)
class IssuedCert:
    """One certificate the CA signed, as recorded in index.json (never a key)."""

    serial: int
    name: str
    role: str
    not_before: float
    not_after: float
    sha256: str
    """Hex sha256 of the DER certificate (what ``openssl x509 -fingerprint -sha256`` shows)."""
    issued_at: float
    revoked_at: float | None = None
    reason: str | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def valid_at(self, ts: float) -> bool:
        """Not revoked and within its validity at ``ts``."""
        return not self.revoked and self.not_before <= ts < self.not_after


@dataclass(frozen=True)
class Issued:
    """A freshly issued certificate: its record, PEM, and the PEM key when the CA made one."""

    record: IssuedCert
    cert_pem: bytes
    key_pem: bytes | None


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a certificate's CN and MQTT username, or None.

    The same rule as device ids (no ``+ # /``, no white space or NUL), because the CN
    becomes ``%u`` in ACL patterns and a level of the topic tree.
    """
    return device_id_problem(name)


def _check_name(name: str, what: str) -> None:
    problem = name_problem(name)
    if problem is not None:
        raise EnrollmentError(
            f"{what} {name!r} cannot be a certificate name: {problem.replace('device id ', '')}"
        )


def _ip_or_dns(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def load_csr(data: bytes, source: str = "CSR") -> ec.EllipticCurvePublicKey:
    """The public key of a PEM or DER certificate signing request whose self-signature
    verifies; its subject is ignored (the CA sets the CN). EnrollmentError otherwise."""
    try:
        csr = (
            x509.load_pem_x509_csr(data)
            if data.lstrip().startswith(b"-----")
            else x509.load_der_x509_csr(data)
        )
    except ValueError as exc:
        raise EnrollmentError(f"{source}: not a certificate signing request: {exc}") from None
    if not csr.is_signature_valid:
        raise EnrollmentError(f"{source}: the request's signature does not verify")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise EnrollmentError(f"{source}: expected an ECDSA P-256 key (secp256r1)")
    return key


class CertificateAuthority:
    """The CA in ``directory``: issues and revokes certificates, writes the CRL."""

    def __init__(self, directory: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.clock = clock

    # --- paths ---------------------------------------------------------------------------

    @property
    def cert_path(self) -> Path:
        return self.directory / CA_CERT

    @property
    def crl_path(self) -> Path:
        return self.directory / CRL_FILE

    @property
    def private_dir(self) -> Path:
        return self.directory / PRIVATE_DIR

    @property
    def key_path(self) -> Path:
        return self.private_dir / CA_KEY

    @property
    def index_path(self) -> Path:
        return self.private_dir / INDEX_FILE

    # --- creation ------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: Path,
        *,
        common_name: str = DEFAULT_CA_NAME,
        organization: str = DEFAULT_ORGANIZATION,
        validity_days: int = DEFAULT_CA_DAYS,
        crl_days: int = DEFAULT_CRL_DAYS,
        clock: Callable[[], float] = time.time,
    ) -> CertificateAuthority:
        """A new CA: key, self-signed certificate, empty CRL. CAError if ``directory``
        holds a CA already or cannot be written."""
        if validity_days < 1 or crl_days < 1:
            raise CAError(f"{directory}: validity and CRL days must be at least 1")
        ca = cls(directory, clock=clock)
        if ca.key_path.exists() or ca.cert_path.exists():
            raise CAError(f"{directory}: a CA exists here already")
        key = _new_key()
        now = clock()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(now - BACKDATE_S))
            .not_valid_after(_utc(now + validity_days * 86400.0))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        try:
            directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.chmod(directory, 0o755)  # the broker reads ca.crt and crl.pem through it
            ca.private_dir.mkdir(mode=0o700, exist_ok=True)
            os.chmod(ca.private_dir, 0o700)
            write_atomic(ca.key_path, _key_pem(key), 0o600)
            write_atomic(ca.cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        except OSError as exc:
            raise CAError(f"{directory}: cannot create the CA: {exc.strerror or exc}") from exc
        with ca._locked():
            ca._save({"crl_number": 0, "crl_days": crl_days, "certificates": []})
            ca._write_crl_locked()
        return ca

    def exists(self) -> bool:
        return self.key_path.is_file() and self.cert_path.is_file()

    # --- reading -------------------------------------------------------------------------

    def certificate(self) -> x509.Certificate:
        """The CA certificate."""
        try:
            return x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except FileNotFoundError:
            raise CAError(
                f"{self.cert_path}: no CA here; run `edgefleet-hub ca init {self.directory}`"
            ) from None
        except OSError as exc:
            raise CAError(f"{self.cert_path}: cannot read: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise CAError(f"{self.cert_path}: not a PEM certificate: {exc}") from exc

    def _key(self) -> ec.EllipticCurvePrivateKey:
        try:
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        except FileNotFoundError:
            raise CAError(
                f"{self.key_path}: no CA key here; run `edgefleet-hub ca init {self.directory}`"
            ) from None
        except OSError as exc:
            raise CAError(f"{self.key_path}: cannot read: {exc.strerror or exc}") from exc
        except (ValueError, TypeError) as exc:
            raise CAError(f"{self.key_path}: not an unencrypted PEM key: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{self.key_path}: expected an ECDSA key")
        return key

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CAError(
                f"{self.index_path}: no CA here; run `edgefleet-hub ca init {self.directory}`"
            ) from None
        except OSError as exc:
            raise CAError(f"{self.index_path}: cannot read: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise CAError(f"{self.index_path}: not JSON: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("certificates"), list):
            raise CAError(f"{self.index_path}: not a CA index")
        return data

    def records(self) -> list[IssuedCert]:
        """Every certificate issued, oldest first."""
        data = self._load()
        try:
            return [
                IssuedCert(**{**entry, "serial": int(entry["serial"], 16)})
                for entry in data["certificates"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise CAError(f"{self.index_path}: bad certificate entry: {exc}") from exc

    def find(self, name: str, role: Role | None = None) -> list[IssuedCert]:
        """The certificates issued to ``name`` (of ``role``), oldest first."""
        return [r for r in self.records() if r.name == name and (role is None or r.role == role)]

    def active(self, name: str, role: Role | None = None) -> list[IssuedCert]:
        """The certificates of ``name`` that are neither revoked nor expired."""
        now = self.clock()
        return [r for r in self.find(name, role) if r.valid_at(now)]

    def names(self, role: Role, *, active: bool = True) -> set[str]:
        """Names holding a valid certificate of ``role`` (``active``), or ever issued one."""
        now = self.clock()
        return {
            r.name for r in self.records() if r.role == role and (r.valid_at(now) or not active)
        }

    def revoked_names(self, role: Role = Role.DEVICE) -> set[str]:
        """Names whose every certificate of ``role`` is revoked (a revoked device)."""
        by_name: dict[str, list[IssuedCert]] = {}
        for r in self.records():
            if r.role == role:
                by_name.setdefault(r.name, []).append(r)
        return {name for name, certs in by_name.items() if all(c.revoked for c in certs)}

    def crl(self) -> x509.CertificateRevocationList:
        try:
            return x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except OSError as exc:
            raise CAError(f"{self.crl_path}: cannot read: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise CAError(f"{self.crl_path}: not a PEM CRL: {exc}") from exc

    @property
    def crl_expires_at(self) -> float:
        """When the CRL's ``next_update`` passes and the broker starts refusing everyone."""
        next_update = self.crl().next_update_utc
        if next_update is None:
            raise CAError(f"{self.crl_path}: the CRL has no next update")
        return next_update.timestamp()

    # --- issuing -------------------------------------------------------------------------

    def issue(
        self,
        name: str,
        role: Role,
        *,
        validity_days: int | None = None,
        public_key: ec.EllipticCurvePublicKey | None = None,
        alt_names: Sequence[str] = (),
    ) -> Issued:
        """Sign a certificate for ``name``; a new P-256 key unless ``public_key`` is given
        (from a CSR: the key never leaves the device). EnrollmentError for a bad name or a
        name that belongs to another role."""
        what = {Role.DEVICE: "device id", Role.HUB: "hub name", Role.SERVER: "server name"}[role]
        if role is Role.SERVER:
            for alt in alt_names:
                if not alt or any(c.isspace() or c in "/\x00" for c in alt):
                    raise EnrollmentError(f"server name {alt!r} is not a host name or address")
            if not name or len(name) > MAX_NAME_LENGTH:
                raise EnrollmentError(f"server name {name!r}: 1 to {MAX_NAME_LENGTH} characters")
        else:
            _check_name(name, what)
        days = validity_days
        if days is None:
            days = DEFAULT_SERVER_DAYS if role is Role.SERVER else DEFAULT_DEVICE_DAYS
        if days < 1:
            raise EnrollmentError(f"{what} {name!r}: validity must be at least 1 day")
        key: ec.EllipticCurvePrivateKey | None = None
        if public_key is None:
            key = _new_key()
            public_key = key.public_key()
        subject_key = public_key
        with self._locked():
            data = self._load()
            for entry in data["certificates"]:
                # Device and hub names share the ACL's username space; a server
                # certificate is never a client one (its extended key usage).
                if role is Role.SERVER or entry["role"] == Role.SERVER:
                    continue
                if entry["name"] == name and entry["role"] != role:
                    raise EnrollmentError(
                        f"{what} {name!r} is already the name of a {entry['role']} certificate"
                    )
            ca_cert = self.certificate()
            ca_key = self._key()
            now = self.clock()
            not_after = min(now + days * 86400.0, ca_cert.not_valid_after_utc.timestamp())
            usage = (
                ExtendedKeyUsageOID.SERVER_AUTH
                if role is Role.SERVER
                else ExtendedKeyUsageOID.CLIENT_AUTH
            )
            builder = (
                x509.CertificateBuilder()
                .subject_name(
                    x509.Name(
                        [
                            x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEFAULT_ORGANIZATION),
                            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
                            x509.NameAttribute(NameOID.COMMON_NAME, name),
                        ]
                    )
                )
                .issuer_name(ca_cert.subject)
                .public_key(subject_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(_utc(now - BACKDATE_S))
                .not_valid_after(_utc(not_after))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=False,
                        crl_sign=False,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    critical=True,
                )
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(
                    x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False
                )
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                    critical=False,
                )
            )
            if role is Role.SERVER:
                sans = list(dict.fromkeys([name, *alt_names]))
                builder = builder.add_extension(
                    x509.SubjectAlternativeName([_ip_or_dns(n) for n in sans]), critical=False
                )
            cert = builder.sign(ca_key, hashes.SHA256())
            record = IssuedCert(
                serial=cert.serial_number,
                name=name,
                role=role.value,
                not_before=cert.not_valid_before_utc.timestamp(),
                not_after=cert.not_valid_after_utc.timestamp(),
                sha256=cert.fingerprint(hashes.SHA256()).hex(),
                issued_at=now,
            )
            data["certificates"].append(_entry(record))
            self._save(data)
        return Issued(
            record=record,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=_key_pem(key) if key is not None else None,
        )

    # --- revoking ------------------------------------------------------------------------

    def revoke(
        self,
        name: str,
        role: Role = Role.DEVICE,
        *,
        reason: str = "unspecified",
        serials: Collection[int] | None = None,
    ) -> list[IssuedCert]:
        """Revoke every certificate of ``name`` (only those in ``serials`` if given) not
        revoked yet and re-sign the CRL.

        Returns the certificates revoked now (empty when all were revoked already);
        EnrollmentError when ``name`` was never issued a certificate of ``role``.
        """
        flag = _reason_flag(reason)
        with self._locked():
            data = self._load()
            entries = [e for e in data["certificates"] if e["name"] == name and e["role"] == role]
            if not entries:
                raise EnrollmentError(f"{role.value} {name!r} is not enrolled: no certificate")
            if serials is not None:
                wanted = {f"{s:x}" for s in serials}
                entries = [e for e in entries if e["serial"] in wanted]
            now = self.clock()
            revoked: list[IssuedCert] = []
            for entry in entries:
                if entry.get("revoked_at") is None:
                    entry["revoked_at"] = now
                    entry["reason"] = flag.value
                    revoked.append(IssuedCert(**{**entry, "serial": int(entry["serial"], 16)}))
            self._save(data)
            self._write_crl_locked()
        return revoked

    def refresh_crl(self, crl_days: int | None = None) -> Path:
        """Re-sign the CRL with a new ``next_update`` (optionally a new CRL lifetime)."""
        with self._locked():
            if crl_days is not None:
                if crl_days < 1:
                    raise CAError(f"{self.directory}: CRL days must be at least 1")
                data = self._load()
                data["crl_days"] = crl_days
                self._save(data)
            return self._write_crl_locked()

    def _write_crl_locked(self) -> Path:
        data = self._load()
        ca_cert = self.certificate()
        ca_key = self._key()
        now = self.clock()
        data["crl_number"] = int(data.get("crl_number", 0)) + 1
        crl_days = int(data.get("crl_days", DEFAULT_CRL_DAYS))
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(_utc(now - BACKDATE_S))
            .next_update(_utc(now + crl_days * 86400.0))
            .add_extension(x509.CRLNumber(data["crl_number"]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        for entry in data["certificates"]:
            if entry.get("revoked_at") is None:
                continue
            revoked = (
                x509.RevokedCertificateBuilder()
                .serial_number(int(entry["serial"], 16))
                .revocation_date(_utc(float(entry["revoked_at"])))
            )
            flag = _reason_flag(entry.get("reason") or "unspecified")
            if flag is not x509.ReasonFlags.unspecified:
                revoked = revoked.add_extension(x509.CRLReason(flag), critical=False)
            builder = builder.add_revoked_certificate(revoked.build())
        crl = builder.sign(ca_key, hashes.SHA256())
        try:
            write_atomic(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
        except OSError as exc:
            raise CAError(f"{self.crl_path}: cannot write: {exc.strerror or exc}") from exc
        self._save(data)
        return self.crl_path

    # --- checking ------------------------------------------------------------------------

    def verify(self, cert_pem: bytes) -> IssuedCert:
        """The record of a certificate this CA signed and has not revoked; CAError else.

        For operators checking a bundle; the broker does its own check with OpenSSL.
        """
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as exc:
            raise CAError(f"not a PEM certificate: {exc}") from exc
        ca_cert = self.certificate()
        ca_key = ca_cert.public_key()
        if cert.issuer != ca_cert.subject or not isinstance(ca_key, ec.EllipticCurvePublicKey):
            raise CAError("the certificate was not issued by this CA")
        hash_algorithm = cert.signature_hash_algorithm
        if hash_algorithm is None:
            raise CAError("the certificate has no signature hash algorithm")
        try:
            ca_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hash_algorithm))
        except InvalidSignature:
            raise CAError("the certificate's signature does not verify with this CA") from None
        serial = cert.serial_number
        record = next((r for r in self.records() if r.serial == serial), None)
        if record is None:
            raise CAError(f"serial {serial:x} is not in {self.index_path}")
        if record.revoked:
            raise CAError(f"{record.role} {record.name!r}: certificate {serial:x} is revoked")
        return record

    # --- storage -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.private_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.private_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise CAError(f"{self.private_dir}: cannot lock: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _save(self, data: dict[str, Any]) -> None:
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        try:
            write_atomic(self.index_path, text.encode(), 0o600)
        except OSError as exc:
            raise CAError(f"{self.index_path}: cannot write: {exc.strerror or exc}") from exc


def _entry(record: IssuedCert) -> dict[str, Any]:
    entry = asdict(record)
    entry["serial"] = f"{record.serial:x}"
    return entry


_REASONS = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key_compromise": x509.ReasonFlags.key_compromise,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "superseded": x509.ReasonFlags.superseded,
    "cessation_of_operation": x509.ReasonFlags.cessation_of_operation,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "affiliation_changed": x509.ReasonFlags.affiliation_changed,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
}
REVOCATION_REASONS = ("unspecified", "key_compromise", "superseded", "cessation_of_operation")
"""Reasons ``revoke`` accepts (the CLI's choices); the camelCase RFC 5280 names work too."""


def _reason_flag(reason: str) -> x509.ReasonFlags:
    try:
        return _REASONS[reason]
    except KeyError:
        raise EnrollmentError(
            f"unknown revocation reason {reason!r}; expected one of {', '.join(REVOCATION_REASONS)}"
        ) from None


@dataclass(frozen=True)
class CAInitResult:
    """What ``ca_init`` created."""

    directory: Path
    ca_cert: Path
    crl: Path
    hub_cert: Path
    hub_key: Path
    hub: IssuedCert


def write_pair(cert_path: Path, key_path: Path | None, issued: Issued) -> None:
    """Write a certificate (0644) and, when there is one, its key (0600); CAError on failure."""
    try:
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cert_path, issued.cert_pem, 0o644)
        if key_path is not None and issued.key_pem is not None:
            write_atomic(key_path, issued.key_pem, 0o600)
    except OSError as exc:
        raise CAError(f"{exc.filename or cert_path}: cannot write: {exc.strerror or exc}") from exc


def issue_hub_certificate(
    ca_dir: Path,
    out_dir: Path,
    *,
    name: str = DEFAULT_HUB_NAME,
    validity_days: int = DEFAULT_SERVER_DAYS,
    clock: Callable[[], float] = time.time,
) -> tuple[Path, Path, IssuedCert]:
    """Issue a client certificate for a hub account ``name`` into ``out_dir``
    (``<name>.crt``, ``<name>.key``): the hub's ``broker.cert_file`` / ``key_file``."""
    ca = CertificateAuthority(ca_dir, clock=clock)
    issued = ca.issue(name, Role.HUB, validity_days=validity_days)
    cert_path, key_path = out_dir / f"{name}.crt", out_dir / f"{name}.key"
    write_pair(cert_path, key_path, issued)
    return cert_path, key_path, issued.record


def ca_init(
    directory: Path,
    *,
    common_name: str = DEFAULT_CA_NAME,
    hub_name: str = DEFAULT_HUB_NAME,
    validity_days: int = DEFAULT_CA_DAYS,
    crl_days: int = DEFAULT_CRL_DAYS,
    clock: Callable[[], float] = time.time,
) -> CAInitResult:
    """``edgefleet-hub ca init DIR``: a new fleet CA in ``directory`` and the hub's client
    certificate (``DIR/private/hub/<hub_name>.crt`` and ``.key``, for hub.toml's ``[broker]``
    ``cert_file`` / ``key_file``). CAError if a CA exists there already."""
    ca = CertificateAuthority.create(
        directory,
        common_name=common_name,
        validity_days=validity_days,
        crl_days=crl_days,
        clock=clock,
    )
    hub_dir = directory / PRIVATE_DIR / "hub"
    cert, key, record = issue_hub_certificate(directory, hub_dir, name=hub_name, clock=clock)
    return CAInitResult(
        directory=directory,
        ca_cert=ca.cert_path,
        crl=ca.crl_path,
        hub_cert=cert,
        hub_key=key,
        hub=record,
    )


def refresh_crl(ca_dir: Path, *, crl_days: int | None = None) -> Path:
    """``edgefleet-hub ca crl``: re-sign the CRL (before it expires; see the module doc)."""
    return CertificateAuthority(ca_dir).refresh_crl(crl_days)
