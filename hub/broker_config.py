"""``edgefleet-hub broker-config``: a mosquitto (2.0) configuration for the fleet.

What it writes into OUT (``write_broker_config``)::

    OUT/mosquitto.conf      listeners, TLS, limits, persistence (0644)
    OUT/acl                 the ACL: devices by %u (their certificate CN), the hub account
    OUT/server.crt, .key    the broker's certificate from the fleet CA (key 0600)
    OUT/passwords           only with a plain listener: the hub account's hashed password
    OUT/hub-password        only with a plain listener: that password for hub.toml (0600)
    OUT/data/               persistence (retained desired documents, sessions, queues)

The configuration points ``cafile`` and ``crlfile`` at the CA directory itself, so a
``device revoke`` takes effect on the next reload (``systemctl reload mosquitto``, i.e.
SIGHUP) without copying files.

Listeners:

- **devices** (``port``, 8883): TLS with ``require_certificate true``,
  ``use_identity_as_username true`` (the MQTT username is the certificate CN, the device
  id) and ``use_username_as_clientid true`` (the client id is replaced by that username,
  so no device can take over another one's session by choosing its client id).
- **hub** (``hub_port``, 8884, on ``hub_bind`` = 127.0.0.1): TLS with a client certificate
  too, but without ``use_username_as_clientid``: the hub opens several connections (the
  ingest and its snapshot reader, several workers) under one account. Keep it on the
  loopback or a private interface: a device certificate is accepted here as well, and
  while the ACL still confines it to its own topics, here it could choose its client id.
- **plain** (``plain_port``, only when asked): 127.0.0.1 only, no TLS, the hub account
  by password (``password_file``); nobody else has a password.

ACL (``acl_file``; mosquitto checks it on every publish, subscribe *and* delivery)::

    pattern write edgefleet/v1/dev/%u/up/#
    pattern read  edgefleet/v1/dev/%u/down/#
    pattern read  edgefleet/v1/hub/state
    user edgefleet-hub
    topic readwrite edgefleet/v1/#
    topic read $SYS/#

``%c`` (client id) patterns are deliberately not used: the client id is the client's
choice; the CN is what the CA vouched for.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import os
import pwd
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from contract.messages import MAX_PACKET_BYTES
from contract.topics import PREFIX
from hub.ca import DEFAULT_HUB_NAME, CertificateAuthority, Role, name_problem, write_pair
from hub.errors import BrokerConfigError, CAError
from hub.keys import write_atomic

CONFIG_FILE = "mosquitto.conf"
ACL_FILE = "acl"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
PASSWORD_FILE = "passwords"
HUB_PASSWORD_FILE = "hub-password"
DATA_DIR = "data"

DEFAULT_PORT = 8883
DEFAULT_HUB_PORT = 8884
DEFAULT_HUB_BIND = "127.0.0.1"
DEFAULT_MAX_PACKET_BYTES = MAX_PACKET_BYTES
"""Largest MQTT packet accepted: a desired document of the largest size agents accept
(1 MiB) with its headers; four times the hub ingest's default message limit."""
DEFAULT_QUEUE_PER_DEVICE = 250
"""QoS 1 messages the broker keeps per device for an offline hub: about two hours of
telemetry at one message every 30 s, plus state and events."""
MIN_QUEUED_MESSAGES = 1000
QUEUED_BYTES_PER_MESSAGE = 4096
MAX_QUEUED_BYTES = 1024 * 1024 * 1024
HUB_MAX_CONNECTIONS = 64
MAX_INFLIGHT_MESSAGES = 100
MAX_KEEPALIVE_S = 300
AUTOSAVE_INTERVAL_S = 60
SYS_INTERVAL_S = 10
PERSISTENT_CLIENT_EXPIRATION = "14d"
SERVER_RENEW_BEFORE_S = 30 * 86400.0
PBKDF2_ITERATIONS = 101
"""mosquitto_passwd's default for ``$7$`` (PBKDF2-SHA512) hashes."""


@dataclass(frozen=True)
class BrokerSettings:
    """Everything ``render_config`` needs; the sizes derive from ``fleet_size``."""

    ca_file: Path
    crl_file: Path
    server_cert: Path
    server_key: Path
    acl_file: Path
    persistence_dir: Path
    fleet_size: int
    port: int = DEFAULT_PORT
    bind: str | None = None
    hub_port: int | None = DEFAULT_HUB_PORT
    hub_bind: str = DEFAULT_HUB_BIND
    plain_port: int | None = None
    password_file: Path | None = None
    log_file: Path | None = None
    max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES
    queue_per_device: int = DEFAULT_QUEUE_PER_DEVICE
    run_as_root: bool = False
    """Emit ``user root`` (tests run as root in throwaway directories); else mosquitto
    drops to its own user after reading the configuration."""

    @property
    def max_connections(self) -> int:
        """Device listener: the fleet plus 10% (at least 16) for reconnect overlap."""
        return self.fleet_size + max(16, self.fleet_size // 10)

    @property
    def max_queued_messages(self) -> int:
        """Per client; sized for the hub's persistent session while the hub is down
        (mosquitto's default 1000 silently drops QoS 1 messages for a fleet)."""
        return max(MIN_QUEUED_MESSAGES, self.fleet_size * self.queue_per_device)

    @property
    def max_queued_bytes(self) -> int:
        """A memory bound beside the count, at most 1 GiB per client."""
        return min(MAX_QUEUED_BYTES, self.max_queued_messages * QUEUED_BYTES_PER_MESSAGE)

    def check(self) -> None:
        """BrokerConfigError for an impossible combination."""
        if self.fleet_size < 1:
            raise BrokerConfigError(f"fleet size must be at least 1, got {self.fleet_size}")
        if self.queue_per_device < 1:
            raise BrokerConfigError(
                f"queue per device must be at least 1, got {self.queue_per_device}"
            )
        if self.max_packet_bytes < 4096:
            raise BrokerConfigError(
                f"max packet size must be at least 4096 bytes, got {self.max_packet_bytes}"
            )
        ports = [("port", self.port), ("hub_port", self.hub_port), ("plain_port", self.plain_port)]
        seen: dict[int, str] = {}
        for option, port in ports:
            if port is None:
                continue
            if not 0 < port < 65536:
                raise BrokerConfigError(f"{option}: {port} is not a TCP port")
            if port in seen:
                raise BrokerConfigError(f"{option}: port {port} is also {seen[port]}")
            seen[port] = option
        if self.plain_port is not None and self.password_file is None:
            raise BrokerConfigError("plain_port: a plain listener needs the hub's password_file")
        for option, value in (("bind", self.bind), ("hub_bind", self.hub_bind)):
            if value is not None and (not value or any(c.isspace() for c in value)):
                raise BrokerConfigError(f"{option}: {value!r} is not an address")
        for path in (self.ca_file, self.crl_file, self.server_cert, self.server_key):
            if any(c in str(path) for c in "\n\r"):
                raise BrokerConfigError(f"{path!r}: a path with a line break")


def _tls_lines(s: BrokerSettings) -> list[str]:
    return [
        f"cafile {s.ca_file}",
        f"certfile {s.server_cert}",
        f"keyfile {s.server_key}",
        f"crlfile {s.crl_file}",
        "tls_version tlsv1.2",
        "require_certificate true",
        "use_identity_as_username true",
    ]


def render_config(s: BrokerSettings) -> str:
    """The text of mosquitto.conf."""
    s.check()
    lines = [
        "# edgefleet broker configuration (written by `edgefleet-hub broker-config`).",
        f"# Sized for a fleet of {s.fleet_size} devices. Reload (SIGHUP) after `device revoke`.",
        "",
        "per_listener_settings false",
        "allow_anonymous false",
        "allow_zero_length_clientid false",
        f"acl_file {s.acl_file}",
    ]
    if s.password_file is not None:
        lines.append(f"password_file {s.password_file}")
    lines += [
        "",
        "# Limits. max_queued_messages is per client and sized for the hub's session while",
        "# the hub is down; devices receive little (their desired state and commands).",
        f"max_queued_messages {s.max_queued_messages}",
        f"max_queued_bytes {s.max_queued_bytes}",
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
        f"max_packet_size {s.max_packet_bytes}",
        f"max_keepalive {MAX_KEEPALIVE_S}",
        f"persistent_client_expiration {PERSISTENT_CLIENT_EXPIRATION}",
        f"sys_interval {SYS_INTERVAL_S}",
        "",
        "# Persistence: retained desired documents and the hub's queued messages survive a",
        "# restart.",
        "persistence true",
        f"persistence_location {str(s.persistence_dir).rstrip('/')}/",
        f"autosave_interval {AUTOSAVE_INTERVAL_S}",
        "",
    ]
    if s.log_file is not None:
        lines.append(f"log_dest file {s.log_file}")
    else:
        lines.append("log_dest stderr")
    lines += [
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
    ]
    if s.run_as_root:
        lines.append("user root")
    lines += [
        "",
        "# Devices: the certificate CN is the username (ACL %u) and the client id.",
        f"listener {s.port}" + (f" {s.bind}" if s.bind else ""),
        *_tls_lines(s),
        "use_username_as_clientid true",
        f"max_connections {s.max_connections}",
    ]
    if s.hub_port is not None:
        lines += [
            "",
            "# The hub: a client certificate as well, its own client ids (ingest, snapshot,",
            "# workers). Keep it on the loopback or a private interface.",
            f"listener {s.hub_port} {s.hub_bind}",
            *_tls_lines(s),
            f"max_connections {HUB_MAX_CONNECTIONS}",
        ]
    if s.plain_port is not None:
        lines += [
            "",
            "# Plain MQTT on the loopback for the hub account (password); nobody else has one.",
            f"listener {s.plain_port} 127.0.0.1",
            f"max_connections {HUB_MAX_CONNECTIONS}",
        ]
    return "\n".join(lines) + "\n"


def render_acl(hub_names: Sequence[str] = (DEFAULT_HUB_NAME,)) -> str:
    """The ACL file: every device confined to its own subtree, the hub accounts to all."""
    if not hub_names:
        raise BrokerConfigError("at least one hub account is needed")
    for name in hub_names:
        problem = name_problem(name)
        if problem is not None:
            raise BrokerConfigError(f"hub account {name!r}: {problem.replace('device id ', '')}")
    lines = [
        "# edgefleet broker ACL (written by `edgefleet-hub broker-config`).",
        "# %u is the client certificate's CN (use_identity_as_username): the device id.",
        "# Patterns apply to every client; mosquitto checks them on publish, subscribe and on",
        "# every delivery, so a wildcard subscription receives only the device's own topics.",
        f"pattern write {PREFIX}/dev/%u/up/#",
        f"pattern read {PREFIX}/dev/%u/down/#",
        f"pattern read {PREFIX}/hub/state",
    ]
    for name in dict.fromkeys(hub_names):
        lines += [
            "",
            f"user {name}",
            f"topic readwrite {PREFIX}/#",
            "topic read $SYS/#",
        ]
    return "\n".join(lines) + "\n"


def mosquitto_password_hash(password: str, *, salt: bytes | None = None) -> str:
    """A mosquitto 2.0 ``$7$`` password hash (PBKDF2-HMAC-SHA512, as mosquitto_passwd)."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    b64 = base64.b64encode
    return f"$7${PBKDF2_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


@dataclass(frozen=True)
class BrokerFiles:
    """What ``write_broker_config`` wrote."""

    config: Path
    acl: Path
    server_cert: Path
    server_key: Path
    ca_cert: Path
    crl: Path
    persistence_dir: Path
    settings: BrokerSettings
    password_file: Path | None = None
    hub_password_file: Path | None = None
    """The plain listener's hub password, for hub.toml's ``broker.password_file``."""


def _server_cert_current(cert_path: Path, names: Sequence[str], ca: CertificateAuthority) -> bool:
    """The existing server certificate is from this CA, names exactly ``names`` and has
    more than 30 days left."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return False
    if cert.issuer != ca.certificate().subject:
        return False
    if cert.not_valid_after_utc.timestamp() - ca.clock() < SERVER_RENEW_BEFORE_S:
        return False
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = {str(n) for n in sans.get_values_for_type(x509.DNSName)}
    have |= {str(n) for n in sans.get_values_for_type(x509.IPAddress)}
    want = set()
    for name in names:
        try:
            want.add(str(ipaddress.ip_address(name)))
        except ValueError:
            want.add(name)
    return have == want


def _give_to(user: str | None, paths: Sequence[Path]) -> None:
    """chown ``paths`` to ``user`` when running as root and the user exists (mosquitto
    reads its files after dropping to that user)."""
    if user is None or os.geteuid() != 0:
        return
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.chown(path, entry.pw_uid, entry.pw_gid)


def write_broker_config(
    out_dir: Path,
    ca_dir: Path,
    *,
    fleet_size: int,
    server_names: Sequence[str] = ("localhost", "127.0.0.1"),
    port: int = DEFAULT_PORT,
    bind: str | None = None,
    hub_port: int | None = DEFAULT_HUB_PORT,
    hub_bind: str = DEFAULT_HUB_BIND,
    hub_names: Sequence[str] = (DEFAULT_HUB_NAME,),
    plain_port: int | None = None,
    persistence_dir: Path | None = None,
    log_file: Path | None = None,
    max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES,
    queue_per_device: int = DEFAULT_QUEUE_PER_DEVICE,
    run_as_root: bool = False,
    broker_user: str | None = "mosquitto",
) -> BrokerFiles:
    """``edgefleet-hub broker-config OUT``: write mosquitto.conf, the ACL and the broker's
    certificate (issued from the CA in ``ca_dir`` for ``server_names``: the host names and
    addresses devices connect to; kept when it still matches) into ``out_dir``.

    ``plain_port`` adds a loopback listener without TLS for the hub account; its password
    is generated once (``hub-password``) and kept on later runs. Running as root, the
    server key, the password file and the persistence directory are given to
    ``broker_user``. BrokerConfigError or CAError on failure.
    """
    ca = CertificateAuthority(ca_dir)
    if not ca.exists():
        raise CAError(f"{ca_dir}: no CA here; run `edgefleet-hub ca init {ca_dir}`")
    if not server_names:
        raise BrokerConfigError("server_names: give the host names devices connect to")
    out_dir = out_dir.absolute()
    ca_dir = ca_dir.absolute()
    data_dir = (persistence_dir or out_dir / DATA_DIR).absolute()
    files = {
        "config": out_dir / CONFIG_FILE,
        "acl": out_dir / ACL_FILE,
        "cert": out_dir / SERVER_CERT,
        "key": out_dir / SERVER_KEY,
    }
    password_path = out_dir / PASSWORD_FILE if plain_port is not None else None
    settings = BrokerSettings(
        ca_file=ca_dir / "ca.crt",
        crl_file=ca_dir / "crl.pem",
        server_cert=files["cert"],
        server_key=files["key"],
        acl_file=files["acl"],
        persistence_dir=data_dir,
        fleet_size=fleet_size,
        port=port,
        bind=bind,
        hub_port=hub_port,
        hub_bind=hub_bind,
        plain_port=plain_port,
        password_file=password_path,
        log_file=log_file.absolute() if log_file is not None else None,
        max_packet_bytes=max_packet_bytes,
        queue_per_device=queue_per_device,
        run_as_root=run_as_root,
    )
    config_text = render_config(settings)
    acl_text = render_acl(hub_names)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise BrokerConfigError(f"{exc.filename}: cannot create: {exc.strerror or exc}") from exc
    if not (files["key"].exists() and _server_cert_current(files["cert"], server_names, ca)):
        issued = ca.issue(server_names[0], Role.SERVER, alt_names=list(server_names[1:]) or ())
        if issued.key_pem is None:  # pragma: no cover - the CA made the key
            raise BrokerConfigError("no server key was generated")
        write_pair(files["cert"], files["key"], issued)
    hub_password_path: Path | None = None
    try:
        if password_path is not None:
            hub_password_path = out_dir / HUB_PASSWORD_FILE
            if hub_password_path.exists():
                password = hub_password_path.read_text(encoding="utf-8").strip()
            else:
                password = secrets.token_urlsafe(24)
                write_atomic(hub_password_path, (password + "\n").encode(), 0o600)
            entries = "".join(
                f"{name}:{mosquitto_password_hash(password)}\n" for name in dict.fromkeys(hub_names)
            )
            write_atomic(password_path, entries.encode(), 0o600)
        write_atomic(files["acl"], acl_text.encode(), 0o644)
        write_atomic(files["config"], config_text.encode(), 0o644)
    except OSError as exc:
        raise BrokerConfigError(
            f"{exc.filename or out_dir}: cannot write: {exc.strerror or exc}"
        ) from exc
    if not run_as_root:
        _give_to(broker_user, [files["key"], data_dir, *([password_path] if password_path else [])])
    return BrokerFiles(
        config=files["config"],
        acl=files["acl"],
        server_cert=files["cert"],
        server_key=files["key"],
        ca_cert=settings.ca_file,
        crl=settings.crl_file,
        persistence_dir=data_dir,
        settings=settings,
        password_file=password_path,
        hub_password_file=hub_password_path,
    )


def server_certificate_names(path: Path) -> list[str]:
    """The subjectAltNames of a broker certificate (for ``broker-config`` output)."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n) for n in sans.get_values_for_type(x509.DNSName)] + [
        str(n) for n in sans.get_values_for_type(x509.IPAddress)
    ]
