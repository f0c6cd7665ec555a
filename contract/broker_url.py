"""The broker settings both configurations share: ``mqtt://host[:port]`` or
``mqtts://host[:port]`` and the rules that tie credentials and TLS files to it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

MQTT_PORT = 1883
MQTTS_PORT = 8883


def check_broker_url(url: str) -> str:
    """``url`` if it is a broker URL without credentials, path or query; ValueError else."""
    expected = f"expected mqtt://host[:port] or mqtts://host[:port], got {url!r}"
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(expected)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{expected} (bad port)") from None
    if port == 0:
        raise ValueError(f"{expected} (bad port)")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{expected} (put credentials in username and password)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{expected} (no path or query)")
    return url


def url_tls(url: str) -> bool:
    return urlsplit(url).scheme == "mqtts"


def url_host(url: str) -> str:
    return urlsplit(url).hostname or ""


def url_port(url: str) -> int:
    """The URL's port, or 8883 for mqtts:// and 1883 for mqtt://."""
    return urlsplit(url).port or (MQTTS_PORT if url_tls(url) else MQTT_PORT)


class BrokerAddress:
    """``tls``, ``host`` and ``port`` of a settings class's ``url`` (a mixin)."""

    if TYPE_CHECKING:
        url: str

    @property
    def tls(self) -> bool:
        return url_tls(self.url)

    @property
    def host(self) -> str:
        return url_host(self.url)

    @property
    def port(self) -> int:
        """The URL's port, or 8883 for mqtts:// and 1883 for mqtt://."""
        return url_port(self.url)


class BrokerFields(Protocol):
    """The broker keys both configurations have."""

    @property
    def url(self) -> str: ...
    @property
    def username(self) -> str | None: ...
    @property
    def password(self) -> object | None: ...
    @property
    def password_file(self) -> object | None: ...
    @property
    def ca_file(self) -> object | None: ...
    @property
    def cert_file(self) -> object | None: ...
    @property
    def key_file(self) -> object | None: ...


def broker_fields_problem(fields: BrokerFields) -> tuple[str, str] | None:
    """(what is expected, the key at fault) when credentials or TLS files do not fit
    together or with the URL; None when they do."""
    if fields.password is not None and fields.password_file is not None:
        return "set password or password_file, not both", "password_file"
    has_password = fields.password is not None or fields.password_file is not None
    if has_password and not fields.username:
        return "a password needs a username", "username"
    if (fields.cert_file is None) != (fields.key_file is None):
        return "cert_file and key_file go together", (
            "key_file" if fields.key_file is None else "cert_file"
        )
    if not url_tls(fields.url):
        for name in ("ca_file", "cert_file", "key_file"):
            if getattr(fields, name) is not None:
                return "TLS files need an mqtts:// url", name
    return None
