"""Flask integration: map a handful of ``ORMCACHE_*`` config keys onto ``Cache`` arguments.

State lives in ``app.extensions["ormcache"]``, never on module globals or ``self.app``,
so one ``Cache`` object can serve an application factory and its tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

if TYPE_CHECKING:
    from flask import Flask

    from .cache import Cache

__all__ = ["CONFIG_KEYS", "init_app"]

#: config key -> (Cache argument, converter)
CONFIG_KEYS: dict[str, tuple[str, Any]] = {
    "ORMCACHE_URL": ("url", str),
    "ORMCACHE_NAMESPACE": ("namespace", str),
    "ORMCACHE_DEFAULT_TTL": ("default_ttl", float),
    "ORMCACHE_STRICT": ("strict", None),
    "ORMCACHE_SECRET": ("secret", str),
    "ORMCACHE_LEASE_TTL": ("lease_ttl", float),
    "ORMCACHE_CONNECT_TIMEOUT": ("connect_timeout", float),
    "ORMCACHE_SOCKET_TIMEOUT": ("socket_timeout", float),
}


def _bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigurationError(f"{key}={value!r} is not a boolean; use true or false")


def init_app(cache: Cache, app: Flask) -> None:
    options: dict[str, Any] = {}
    for key, (arg, convert) in CONFIG_KEYS.items():
        if key not in app.config or app.config[key] is None:
            continue
        value = app.config[key]
        if convert is None:
            options[arg] = _bool(key, value)
        else:
            try:
                options[arg] = convert(value)
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(f"{key}={value!r} is invalid: {exc}") from exc
    unknown = sorted(k for k in app.config if k.startswith("ORMCACHE_") and k not in CONFIG_KEYS)
    if unknown:
        raise ConfigurationError(
            f"unknown config keys {unknown}; ormcache reads {sorted(CONFIG_KEYS)}"
        )
    if options:
        cache.configure(**options)
    app.extensions["ormcache"] = cache
