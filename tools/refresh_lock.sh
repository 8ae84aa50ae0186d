#!/usr/bin/env bash
# Rewrite requirements-lock.txt with the newest releases that requirements.txt admits today.
# Then run the tests against it (bash .ci/run) and commit the lock with the fixes it needed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt
{
  echo "# The exact versions the test suite last passed with (Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'), $(uname -m))."
  echo "# Install: pip install -r requirements.txt -c requirements-lock.txt   Refresh: bash tools/refresh_lock.sh"
  "$venv/bin/python" -m pip freeze --all --disable-pip-version-check | grep -v -E "^(pip|vit-token-compression)[= @]"
} > requirements-lock.txt
echo "wrote requirements-lock.txt"
