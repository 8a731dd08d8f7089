"""A Flask API whose every request authenticates by API key, as in the seed, built right.

* Keys are stored as SHA-256 hashes; the raw key is shown once, at creation or rotation,
  and never reaches a log line, a cache key or an error body.
* The key lookup is memoized with ormcache. Revocation and rotation commit through the
  attached session, so they take effect on the very next request in every worker.
* Unknown keys are negatively cached briefly; creating a key invalidates that entry.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import os
import re
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, jsonify, request
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import scoped_session, sessionmaker
from werkzeug.exceptions import HTTPException

from ormcache import Cache

from .models import ApiKey, Base, User, hash_api_key, new_api_key, utcnow
from .openapi import OPENAPI

log = logging.getLogger("keyservice")

EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,189}\.[^@\s]{1,63}$")


class ApiError(Exception):
    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message


def _json_body() -> dict[str, Any]:
    if not request.is_json:
        raise ApiError(
            415, "unsupported_media_type", "send a JSON body with Content-Type: application/json"
        )
    try:
        body = request.get_json(silent=True)
    except (RecursionError, ValueError):
        # Nested deeper than the parser's recursion limit, or not text at all: silent=True
        # only covers what Flask itself turns into a 400.
        body = None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return body


def _string(body: dict[str, Any], name: str, *, max_len: int) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ApiError(422, "invalid", f"'{name}' is required and must be a non-empty string")
    value = value.strip()
    if len(value) > max_len:
        raise ApiError(422, "invalid", f"'{name}' must be at most {max_len} characters")
    if "\x00" in value:
        raise ApiError(422, "invalid", f"'{name}' must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no database can store it
        raise ApiError(422, "invalid", f"'{name}' must be valid Unicode text") from None
    return value


def _user_json(user: User) -> dict[str, Any]:
    created = user.created_at
    if created.tzinfo is None:  # SQLite and MariaDB return the stored UTC time naive
        created = created.replace(tzinfo=dt.timezone.utc)
    return {
        "id": user.id,
        "name": user.name,
        "email": user.email,
        "created_at": created.isoformat(),
    }


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.update(
        DATABASE_URL=os.environ.get("DATABASE_URL"),
        ORMCACHE_URL=os.environ.get("ORMCACHE_URL", "memory://"),
        ORMCACHE_NAMESPACE=os.environ.get("ORMCACHE_NAMESPACE", "keyservice"),
        ORMCACHE_DEFAULT_TTL=300,
        ORMCACHE_STRICT=os.environ.get("ORMCACHE_STRICT", "false"),
        # Signs every cached entry (see the README): without it, whoever can write to
        # Redis can plant an entry that authenticates a made-up key.
        ORMCACHE_SECRET=os.environ.get("ORMCACHE_SECRET") or None,
        # Unset: the default for the URL (on for redis://). "false" turns it off.
        ORMCACHE_NEAR_CACHE=os.environ.get("ORMCACHE_NEAR_CACHE") or None,
        KEYSERVICE_NEGATIVE_TTL=float(os.environ.get("KEYSERVICE_NEGATIVE_TTL", "30")),
    )
    if config:
        app.config.update(config)
    url = app.config["DATABASE_URL"]
    if not url:
        Path(app.instance_path).mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{Path(app.instance_path) / 'keyservice.sqlite'}"
    # hide_parameters: a database error's message (and so the log) never carries a
    # statement's values, such as a key hash or an e-mail address.
    engine = create_engine(url, pool_pre_ping=True, hide_parameters=True)
    Base.metadata.create_all(engine)
    # With gunicorn --preload this runs in the master: forked workers must not share its
    # pooled connections.
    engine.dispose()
    Session = scoped_session(sessionmaker(engine, expire_on_commit=False))

    cache_enabled = str(
        app.config.get("KEYSERVICE_CACHE", os.environ.get("KEYSERVICE_CACHE", "on"))
    )
    cache = Cache()
    db_config = {k: v for k, v in app.config.items() if k.startswith("ORMCACHE_")}
    app.config.from_mapping(db_config)
    cache.init_app(app)
    cache.attach(Session)
    negative_ttl = float(app.config["KEYSERVICE_NEGATIVE_TTL"])

    def lookup(key_hash: str) -> ApiKey | None:
        """The hot path: one cached lookup per request, invalidated by every commit that
        touches this key's row or its user."""
        with Session.session_factory() as s:
            return s.scalars(select(ApiKey).where(ApiKey.key_hash == key_hash)).one_or_none()

    # KEYSERVICE_CACHE=off serves every lookup from the database (the load test's baseline).
    find_key = (
        lookup
        if cache_enabled.lower() in ("off", "0", "false")
        else cache.memoize(ttl=app.config["ORMCACHE_DEFAULT_TTL"], negative_ttl=negative_ttl)(
            lookup
        )
    )

    app.extensions["keyservice"] = {"engine": engine, "Session": Session, "find_key": find_key}

    @app.teardown_appcontext
    def remove_session(exc: BaseException | None) -> None:
        Session.remove()

    def authenticate() -> ApiKey:
        header = request.headers.get("Authorization", "")
        raw = header[7:].strip() if header[:7].lower() == "bearer " else ""
        raw = raw or request.headers.get("X-API-Key", "").strip()
        if not raw:
            raise ApiError(
                401, "unauthorized", "send your API key as 'Authorization: Bearer <key>'"
            )
        digest = hash_api_key(raw)
        key = find_key(digest)
        if key is None or not hmac.compare_digest(key.key_hash, digest) or key.revoked_at:
            raise ApiError(401, "unauthorized", "the API key is unknown or revoked")
        g.api_key = key
        return key

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> tuple[Response, int]:
        response = jsonify(error=exc.error, message=exc.message)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="keyservice"'
        return response, exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        name = (exc.name or "error").lower().replace(" ", "_")
        return jsonify(error=name, message=exc.description or exc.name), status

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error")  # the traceback, never the request's key
        return jsonify(error="internal", message="internal error; see the server log"), 500

    @app.post("/users")
    def create_user() -> tuple[Response, int]:
        body = _json_body()
        name = _string(body, "name", max_len=100)
        email = _string(body, "email", max_len=254).lower()
        # Lower-casing may lengthen it (U+0130 becomes two characters): check again.
        if len(email) > 254 or not EMAIL_RE.match(email):
            raise ApiError(422, "invalid", "'email' must be an e-mail address")
        raw = new_api_key()
        s = Session()
        user = User(name=name, email=email)
        s.add(user)
        s.add(ApiKey(user=user, key_hash=hash_api_key(raw), prefix=raw[:10]))
        try:
            s.commit()
        except IntegrityError:
            s.rollback()
            raise ApiError(409, "conflict", "a user with this e-mail already exists") from None
        return jsonify(user=_user_json(user), api_key=raw), 201

    @app.get("/me")
    def me() -> Response:
        key = authenticate()
        return jsonify(user=_user_json(key.user), key={"prefix": key.prefix, "id": key.id})

    def revoke_once(s: Any, key_id: int) -> bool:
        """Revoke the key if it is still live, atomically: True for the one request that
        did it. A conditional UPDATE is atomic on every supported database, where reading
        the row first is not: SQLite has no SELECT ... FOR UPDATE, so two rotations both
        read the key as live and both issued a new key. The loser's UPDATE waits for the
        winner's commit (a row lock, or SQLite's write lock) and matches no row."""
        result = s.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount == 1)

    @app.post("/keys/rotate")
    def rotate() -> Response:
        current = authenticate()
        s = Session()
        if not revoke_once(s, current.id):
            s.rollback()
            raise ApiError(
                409, "conflict", "the API key was rotated or revoked by a concurrent request"
            )
        raw = new_api_key()
        s.add(ApiKey(user_id=current.user_id, key_hash=hash_api_key(raw), prefix=raw[:10]))
        s.commit()
        return jsonify(api_key=raw)

    @app.post("/keys/revoke")
    def revoke() -> tuple[str, int]:
        current = authenticate()
        s = Session()
        if revoke_once(s, current.id):
            s.commit()
        else:
            s.rollback()  # revoked meanwhile: the outcome the client asked for
        return "", 204

    @app.get("/health")
    def health() -> tuple[Response, int]:
        db_ok = True
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception:
            db_ok = False
        stats = cache.stats()
        body = {
            "status": "ok" if db_ok else "degraded",
            "database": "ok" if db_ok else "unreachable",
            "cache": "ok" if not cache.bypassing else "bypassed",
            "cache_errors": stats.errors,
        }
        return jsonify(body), 200 if db_ok else 503

    @app.get("/stats")
    def stats() -> Response:
        return jsonify(cache.stats().as_dict())

    @app.get("/openapi.json")
    def openapi() -> Response:
        return jsonify(OPENAPI)

    return app
