"""ormcache inside a real application's own test suite (see ``python -m examples.realapp``)."""
