#!/usr/bin/env bash
# Download the wheels benchmarks/gpu/check.sh installs on the device machine (no registry is reachable there):
# cp312 manylinux x86_64 wheels of every `name==version` in benchmarks/gpu/wheels.txt, --no-deps, into
# benchmarks/gpu/wheels/ (git-ignored; carry it: run's carry=["benchmarks/gpu/wheels"]). Run it on the CPU box:
#
#     bash benchmarks/gpu/fetch_wheels.sh [DEST]
#
# A package published only as an sdist (antlr4-python3-runtime 4.9.3) is built here into a pure-Python wheel.
# The folder is replaced only when every wheel arrived; it must stay well under the 64 MiB the device call carries.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
dest=${1:-$here/wheels}
list=$here/wheels.txt
max_mib=32
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x "$repo/.venv/bin/python" ]; then py=$repo/.venv/bin/python
else py=python3
fi

platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mapfile -t wanted < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$list" | grep -v '^$')
[ "${#wanted[@]}" -gt 0 ] || { echo "fetch_wheels: no packages in $list" >&2; exit 1; }

mkdir -p "$(dirname "$dest")"
tmp=$(mktemp -d "$dest.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
for req in "${wanted[@]}"; do
  echo "== $req"
  if "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
       "${platforms[@]}" -d "$tmp" "$req" 2>"$tmp/err"; then
    continue
  fi
  grep -q "No matching distribution" "$tmp/err" || { cat "$tmp/err" >&2; exit 1; }
  echo "   no cp312 manylinux wheel on the index: building a pure-Python wheel from the sdist"
  "$py" -m pip wheel -q --no-deps --no-binary=:all: -w "$tmp/build" "$req"
  built=$(ls "$tmp"/build/*.whl)
  case "$built" in
    *-py3-none-any.whl|*-py2.py3-none-any.whl) mv "$built" "$tmp/" ;;
    *) echo "fetch_wheels: $req built a platform wheel ($built): it would not run on the device" >&2; exit 1 ;;
  esac
  rm -rf "$tmp/build"
done
rm -f "$tmp/err"

count=$(ls "$tmp"/*.whl | wc -l)
[ "$count" -eq "${#wanted[@]}" ] || { echo "fetch_wheels: got $count wheels for ${#wanted[@]} packages" >&2; exit 1; }
bytes=$(du -cb "$tmp"/*.whl | tail -1 | cut -f1)
if [ "$bytes" -gt $((max_mib * 1024 * 1024)) ]; then
  echo "fetch_wheels: $bytes bytes is over the $max_mib MiB this folder may take" >&2; exit 1
fi
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
chmod 755 "$dest"
ls -l "$dest"
awk -v b="$bytes" -v n="$count" -v d="$dest" 'BEGIN { printf "%d wheels, %.2f MiB in %s\n", n, b / 1048576, d }'
