"""The reference API-key service: the seed's Flask API, built right with ormcache."""

from .app import create_app

__all__ = ["create_app"]
