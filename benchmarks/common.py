"""Where the benchmarks write their results and which services they measure against.

``BENCH_REDIS_URL`` and ``BENCH_POSTGRES_URL`` point them elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
