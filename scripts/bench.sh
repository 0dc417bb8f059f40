#!/usr/bin/env bash
# Runs skybridge's benchmarks on this machine and prints their tables:
# the Go micro-benchmarks (admission, policy decisions) and, as root, the
# migration benchmark against rsync over a real WireGuard mesh between
# network namespaces. Figures go into docs/BENCHMARKS.md by hand, with the
# date and the machine. Not part of the tests: nothing here asserts speed.
#
#   ./scripts/bench.sh                 everything
#   SKYBRIDGE_BENCH_GIB=8 ./scripts/bench.sh   a larger image for the migration benchmark
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for p in qemu-utils rsync wireguard-tools iproute2; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq && $sudo apt-get install -y --no-install-recommends "${need[@]}"
fi

echo "== admission and policy micro-benchmarks"
go test -run '^$' -bench . -benchmem -count 3 ./certs/ ./policy/

if [ "$(id -u)" -eq 0 ]; then
  echo
  echo "== migration: skybridge migrate vs rsync over the same mesh"
  SKYBRIDGE_BENCH=1 go test -v -count=1 -timeout 30m -run TestBenchMigrateVsRsync ./e2e/ 2>&1 | grep -E '^\||^image|^ok|FAIL|Error' || true
else
  echo "(the migration benchmark needs root for its network namespaces)"
fi
