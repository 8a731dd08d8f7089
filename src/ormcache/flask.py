"""Flask integration: map a handful of ``ORMCACHE_*`` config keys onto ``Cache`` arguments.

``cache.init_app(app)`` registers the cache in ``app.extensions["ormcache"]`` (never on
module globals or ``self.app``). A ``Cache`` holds one configuration: its backend,
namespace and counters are shared by everything that uses it. So several applications
may share one ``Cache`` only if their ``ORMCACHE_*`` settings agree (an application
factory called once per test, with the same config, is fine); an application that asks
for different settings gets a :class:`~ormcache.ConfigurationError` telling it to use a
``Cache`` of its own, instead of silently reconfiguring the cache under the first one.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from .backends.base import redact_url
from .errors import ConfigurationError

if TYPE_CHECKING:
    from flask import Flask

    from .core import Settings

__all__ = ["CONFIG_KEYS", "config_options", "settings_conflict", "warn_flask_caching_leftovers"]

logger = logging.getLogger("ormcache")

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
    "ORMCACHE_MAX_BYTES": ("max_bytes", int),
    "ORMCACHE_GENERATION_TTL": ("generation_ttl", float),
    "ORMCACHE_NEAR_CACHE": ("near_cache", "near"),
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


def _near(key: str, value: object) -> bool | int:
    """A boolean, or a number of entries (``ORMCACHE_NEAR_CACHE=5000``); "1" and "0" are
    the booleans, as for the other flags."""
    if isinstance(value, bool):
        return value
    text = str(value).strip()
    if isinstance(value, int) or (text.isdigit() and text not in ("0", "1")):
        number = int(text)
        if number < 1:
            raise ConfigurationError(f"{key}={value!r}: a number of entries must be positive")
        return number
    return _bool(key, value)


def config_options(app: Flask) -> dict[str, Any]:
    """The ``Cache`` arguments that ``app.config``'s ``ORMCACHE_*`` keys set."""
    options: dict[str, Any] = {}
    for key, (arg, convert) in CONFIG_KEYS.items():
        if key not in app.config or app.config[key] is None:
            continue
        value = app.config[key]
        if convert is None:
            options[arg] = _bool(key, value)
        elif convert == "near":
            options[arg] = _near(key, value)
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
    return options


def warn_flask_caching_leftovers(app: Flask, url: str) -> None:
    """Say so when flask-caching's config is left behind and the cache is per process.

    An application migrated from flask-caching keeps ``CACHE_REDIS_URL`` and friends, but
    ormcache reads ``ORMCACHE_URL``: without it, each worker caches in its own memory, and
    a commit in one cannot invalidate another's entries (a revoked API key then works in
    some workers and not in others).
    """
    if not url.startswith("memory") or app.config.get("ORMCACHE_URL"):
        return
    leftovers = sorted(k for k in app.config if k.startswith("CACHE_"))
    if not leftovers:
        return
    message = (
        f"ormcache: app.config has flask-caching settings ({', '.join(leftovers)}) but no "
        "ORMCACHE_URL, so ormcache caches in per-process memory (memory://): a commit in "
        "one worker cannot invalidate the entries of another. Set ORMCACHE_URL to your "
        "Redis URL (e.g. the one in CACHE_REDIS_URL)"
    )
    logger.warning(message)
    warnings.warn(message, UserWarning, stacklevel=3)


def settings_conflict(first: Flask | None, app: Flask, applied: Settings, wanted: Settings) -> str:
    """Why ``app`` may not share this Cache: the settings that differ (never a secret)."""
    shown = []
    for f in fields(applied):
        name, before, after = f.name, getattr(applied, f.name), getattr(wanted, f.name)
        if before == after:
            continue
        if name in ("secret", "backend"):
            shown.append(name)  # never a secret's value in an error message
        elif name == "url":
            shown.append(f"url {_shown_url(before)} -> {_shown_url(after)}")
        else:
            shown.append(f"{name} {before!r} -> {after!r}")
    owner = "another application" if first is None else f"application {first.name!r}"
    return (
        f"this Cache is configured for {owner}; application {app.name!r} asks for "
        f"different settings ({'; '.join(shown)}). One Cache holds one configuration "
        "(backend, namespace, counters), so applying them would change it under the "
        "first application: give each application its own Cache(), or the same "
        "ORMCACHE_* settings"
    )


def _shown_url(url: object) -> str:
    return "unset" if url is None else redact_url(str(url))
