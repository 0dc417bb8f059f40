#!/usr/bin/env bash
# Runs every fuzz target for a while, one after the other, one worker each
# (the default suite runs only their seeds). A finding is saved under the
# package's testdata/fuzz/ and makes this exit non-zero; `go test -run
# 'FuzzX/ID' ./pkg/` replays it.
#
#   ./scripts/fuzz.sh                 # every target, 60 s each (about 16 minutes)
#   FUZZTIME=10m ./scripts/fuzz.sh FuzzHandle FuzzFrames
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime=${FUZZTIME:-60s}
want=("$@")
failed=()
while read -r pkg target; do
  if [ ${#want[@]} -gt 0 ] && ! printf '%s\n' "${want[@]}" | grep -qx "$target"; then
    continue
  fi
  echo "== $target ($pkg, $fuzztime)"
  if ! go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" -parallel 1 "./$pkg/"; then
    failed+=("$target")
  fi
done < <(grep -r --include='*_test.go' -o '^func Fuzz[A-Za-z0-9_]*' . | sed 's|^\./||; s|/[^/]*_test.go:func | |' | grep -v '^e2e/' | sort)
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzing found something in: ${failed[*]}" >&2
  exit 1
fi
echo "no finding"
