#!/usr/bin/env bash
# The README's test command: set up .venv if needed, then run the test suite (pytest exit 5,
# "no tests collected", counts as a failure here: the suite must never be empty).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -rs "$@"  # -rs: every skipped test is listed with its reason
