# Sourced by scripts/run and scripts/test: make .venv with ormcache and every extra.
# Re-installs only when pyproject.toml changed, so repeated runs start in a second.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "ormcache needs Python 3.10 or newer; set PYTHON=/path/to/python3.x" >&2
    exit 1
fi
STAMP=".venv/.ormcache-installed"
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "==> setting up .venv (first run only; about a minute)" >&2
    "$PY" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
    echo "==> installing ormcache with extras [all]" >&2
    .venv/bin/python -m pip install --quiet -e '.[all]' 2>&1 | grep -v '^WARNING: Location' >&2 || true
    .venv/bin/python -c 'import ormcache, redis, flask, hypothesis' \
        || { echo "installation failed; see the pip output above" >&2; exit 1; }
    echo "$WANT" > "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
