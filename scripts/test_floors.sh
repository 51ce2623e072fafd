#!/usr/bin/env bash
# The dependency floors of pyproject.toml, tested: a fresh virtual environment with every
# dependency at exactly its floor (">=X" installed as "==X"), then the fast tests.
#
#     scripts/test_floors.sh [VENV] [PYTEST ARGS...]     (default: /tmp/autoseg-floors, -m "not slow")
#
# torch comes from the PyTorch CPU index ($TORCH_INDEX), so that no CUDA build is pulled;
# where that index cannot be reached, the script says so and tests the other floors with the
# newest CPU torch pip finds (the result then says nothing about torch's floor).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/autoseg-floors}; shift || true
[[ $# -gt 0 ]] || set -- -m "not slow"
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
python3 -m venv --clear "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
mapfile -t floors < <(python3 - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
    print(re.sub(r"\s*>=\s*", "==", requirement.split(";")[0].split(",")[0].strip()))
PY
)
torch_floor=$(printf '%s\n' "${floors[@]}" | grep '^torch==')
others=($(printf '%s\n' "${floors[@]}" | grep -v '^torch=='))
if "${pip[@]}" --index-url "$TORCH_INDEX" "$torch_floor"; then
    echo "floors: $torch_floor from $TORCH_INDEX"
else
    echo "floors: $torch_floor could not be installed from $TORCH_INDEX; torch's floor is NOT tested" >&2
    "${pip[@]}" "torch==$(python3 -c 'import torch; print(torch.__version__)')"
fi
# The floors, and torch held where it is (a dependency must not move it).
"${pip[@]}" "${others[@]}" "torch==$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
"${pip[@]}" --no-deps -e .
"$venv/bin/python" -m pip list --disable-pip-version-check 2>/dev/null | grep -i -E "^($(printf '%s|' "${floors[@]%%==*}")x) "
PYTHONPATH="$PWD" "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
