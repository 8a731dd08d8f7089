"""Helpers shared by the test modules: plain code, no fixtures (those live in
``tests/conftest.py``), so one definition serves every module that needs it."""
