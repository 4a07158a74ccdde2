#!/usr/bin/env bash
# Side-by-side benchmarks of aioqueue and its peers. Usage: bash benchmarks/bench.sh [--quick]
# Builds one virtualenv per contestant under benchmarks/.venvs/ (peers are never aioqueue deps),
# then runs benchmarks/run.py. Extra arguments go to run.py (--only ID,ID / --skip ID,ID).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
VENVS="$HERE/.venvs"
PYTHON="${PYTHON:-python3}"
mkdir -p "$VENVS"

# make_venv NAME REQUIREMENTS_FILE KEY [extra pip args...]: (re)build when the inputs change
make_venv() {
  local name="$1" req="$2" key="$3"; shift 3
  local dir="$VENVS/$name" stamp="$VENVS/$name/.stamp"
  local want; want="$(cat "$req" 2>/dev/null; echo "$key $*")"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return 0; fi
  echo "bench: building venv $name" >&2
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir" || return 1
  "$dir/bin/pip" install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1
  if "$dir/bin/pip" install -q --disable-pip-version-check -r "$req" "$@" >"$VENVS/$name.log" 2>&1
  then printf '%s' "$want" >"$stamp"
  else echo "bench: venv $name failed to install (see $VENVS/$name.log); its rows will be skipped" >&2
  fi
}

make_venv orch "$HERE/requirements/orch.txt" "" || exit 1
for v in floor arq saq taskiq streaq dramatiq celery; do
  make_venv "$v" "$HERE/requirements/$v.txt" "" &
done
# aioqueue from this checkout, editable; rebuilt when pyproject.toml changes
make_venv aioqueue "$HERE/requirements/aioqueue.txt" \
  "$(sha1sum "$REPO/pyproject.toml" | cut -c1-12)" -e "$REPO" &
wait

exec "$VENVS/orch/bin/python" "$HERE/run.py" "$@"
