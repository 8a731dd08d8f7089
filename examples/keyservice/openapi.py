"""The service's OpenAPI 3.0 document (schemathesis fuzzes the service against it)."""

from __future__ import annotations

from typing import Any

_ERROR = {
    "description": "error",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error", "message"],
                "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
            }
        }
    },
}
_USER = {
    "type": "object",
    "required": ["id", "name", "email", "created_at"],
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string"},
        "email": {"type": "string"},
        "created_at": {"type": "string"},
    },
}
_AUTH = [{"bearer": []}]


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "ormcache reference API-key service",
        "version": "1.0.0",
        "description": "Every request authenticates by API key; lookups are cached with "
        "ormcache and revocation takes effect on the next request.",
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
    "paths": {
        "/users": {
            "post": {
                "summary": "Create a user; the API key is returned once",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["name", "email"],
                                "properties": {
                                    "name": {"type": "string", "maxLength": 100},
                                    "email": {"type": "string", "maxLength": 254},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "201": _json(
                        {
                            "type": "object",
                            "required": ["user", "api_key"],
                            "properties": {"user": _USER, "api_key": {"type": "string"}},
                        },
                        "created",
                    ),
                    "400": _ERROR,
                    "409": _ERROR,
                    "415": _ERROR,
                    "422": _ERROR,
                },
            }
        },
        "/me": {
            "get": {
                "summary": "The authenticated user",
                "security": _AUTH,
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["user", "key"],
                            "properties": {
                                "user": _USER,
                                "key": {
                                    "type": "object",
                                    "properties": {
                                        "id": {"type": "integer"},
                                        "prefix": {"type": "string"},
                                    },
                                },
                            },
                        },
                        "the user",
                    ),
                    "401": _ERROR,
                },
            }
        },
        "/keys/rotate": {
            "post": {
                "summary": "Revoke the key used and return a new one",
                "security": _AUTH,
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["api_key"],
                            "properties": {"api_key": {"type": "string"}},
                        },
                        "the new key",
                    ),
                    "401": _ERROR,
                    # A concurrent rotation or revocation of the same key won.
                    "409": _ERROR,
                },
            }
        },
        "/keys/revoke": {
            "post": {
                "summary": "Revoke the key used",
                "security": _AUTH,
                "responses": {"204": {"description": "revoked"}, "401": _ERROR},
            }
        },
        "/health": {
            "get": {
                "summary": "Database and cache health",
                "responses": {
                    "200": _json({"type": "object"}, "healthy"),
                    "503": _json({"type": "object"}, "database unreachable"),
                },
            }
        },
        "/stats": {
            "get": {
                "summary": "Cache statistics",
                "responses": {"200": _json({"type": "object"}, "counters")},
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.0")},
            }
        },
    },
}
