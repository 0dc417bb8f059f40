#!/usr/bin/env bash
# Runs skybridge's benchmark suite on this machine and prints its tables
# (docs/BENCHMARKS.md holds the latest, with the machine and what limits
# each figure). Benchmarks print figures; they assert nothing about speed.
#
#   ./scripts/bench.sh            everything (root: about 15 minutes on 2 cores)
#   ./scripts/bench.sh micro      Go micro-benchmarks (admission, policy, topology)
#   ./scripts/bench.sh scale      N gateways in one process, and N plain memberlist instances as the
#                                 reference: convergence, crash removal, CPU, memory, gossip
#   ./scripts/bench.sh dataplane  TCP over raw veth vs skybridge vs upstream and Debian wireguard-go (root)
#   ./scripts/bench.sh migrate    skybridge migrate vs rsync -S / -Sz, resume, re-sync (root)
#   ./scripts/bench.sh footprint  RSS and CPU of a gateway with 100 peers, idle and migrating
#   ./scripts/bench.sh burst      burst gateways: join to routable, burst down to gone (root)
#   ./scripts/bench.sh loss       a site's routes under packet loss on the underlay (root; not in the
#                                 default run: 8 minutes at the default 5 and 10 % for 4 minutes each)
#
# Knobs: SKYBRIDGE_BENCH_SIZES=10,100,300,1000 (scale), SKYBRIDGE_BENCH_ROUNDS=3
# and SKYBRIDGE_BENCH_SECONDS=5 (dataplane), SKYBRIDGE_BENCH_GIB=8 (migrate),
# SKYBRIDGE_BENCH_JOINS=10 (burst), SKYBRIDGE_BENCH_LOSS=5,10 and SKYBRIDGE_BENCH_LOSS_FOR=240 (loss), SKYBRIDGE_BENCH_PERF=DIR (dataplane: perf profile of each WireGuard
# implementation through a round of its own; migrate: of both gateways during a migration of its own), SKYBRIDGE_BENCH_PPROF=FILE (scale: CPU profile of the
# largest size), SKYBRIDGE_BENCH_REFERENCE=0 (scale: skip the memberlist reference).
set -euo pipefail
cd "$(dirname "$0")/.."

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(micro scale dataplane migrate footprint burst)
root=false
[ "$(id -u)" -eq 0 ] && root=true

need=()
for p in qemu-utils rsync wireguard-tools iproute2 nftables iperf3 wireguard-go procps; do # procps: sysctl (loss)
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ -n "${SKYBRIDGE_BENCH_PERF:-}" ] && ! command -v perf >/dev/null; then need+=(linux-perf); fi
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; $root || sudo="sudo"
  # Through env: sudo's env_reset drops a variable set before it, and
  # iperf3's debconf question then stops the script at a prompt.
  $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"
fi
go mod download

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
started=$(date +%s)
failed=()

# table prints a part's tables once: the tests print them to stdout and,
# indented, to their logs.
table() {
  if [ "$1" = micro ]; then grep -E '^Benchmark' "$out/$1" || true; return; fi
  grep -vE '^\s' "$out/$1" | grep -E '^\||^(image|TCP|routes|[0-9]+ (gateway|burst))' || true
  if { [ "$1" = dataplane ] || [ "$1" = migrate ]; } && [ -n "${SKYBRIDGE_BENCH_PERF:-}" ]; then
    sed -n '/^== where the cycles go/,/^$/p' "$out/$1"
  fi
}

run() { # part, then the command; a failed part is shown and the others still run
  local part=$1; shift
  if "$@" >"$out/$part" 2>&1; then table "$part"; else
    tail -n 60 "$out/$part"; failed+=("$part")
  fi
}

for part in "${parts[@]}"; do
  case "$part" in
  micro)
    echo "== micro-benchmarks"
    run micro go test -p 1 -run '^$' -bench . -benchmem -count 1 ./certs/ ./policy/ ./mesh/ ;; # -p 1: packages one at a time, not competing for the cores
  scale)
    echo "== mesh convergence at scale (one process, real memberlist on loopback, recorded WireGuard)"
    run scale env SKYBRIDGE_BENCH_SCALE=1 go test -count=1 -v -timeout 40m -run TestScaleConvergence ./mesh/ ;;
  footprint)
    # Netstack gateways on loopback: no namespace, no TUN, so no root.
    echo "== gateway footprint"
    run footprint env SKYBRIDGE_BENCH=1 go test -count=1 -v -timeout 20m -run TestBenchFootprint ./e2e/ ;;
  dataplane|migrate|burst|loss)
    if ! $root; then echo "== $part: needs root (network namespaces, TUN); skipped"; continue; fi
    case "$part" in
    dataplane)
      # The upstream reference: wireguard-go built from the very module
      # version skybridge embeds. A build that fails fails the part, but
      # the other paths are still measured: the table shows the upstream
      # row as missing.
      upstream="$out/bin/wireguard"
      ver=$(go list -m -f '{{.Version}}' golang.zx2c4.com/wireguard) || ver=""
      echo "== data plane (upstream wireguard-go ${ver:-of unknown version})"
      if [ -z "$ver" ] || ! GOBIN="$out/bin" go install "golang.zx2c4.com/wireguard@$ver" >"$out/upstream-build" 2>&1; then
        tail -n 20 "$out/upstream-build" 2>/dev/null || true
        echo "building the upstream wireguard-go failed: the data plane is measured without it (check the Go module proxy, then run ./scripts/bench.sh dataplane again)"
        failed+=("dataplane (upstream wireguard-go build)")
        upstream=""
      fi
      run dataplane env SKYBRIDGE_BENCH=1 SKYBRIDGE_WG_UPSTREAM="$upstream" go test -count=1 -v -timeout 20m -run TestBenchDataPlane ./e2e/ ;;
    migrate)
      echo "== migration vs rsync"
      run migrate env SKYBRIDGE_BENCH=1 go test -count=1 -v -timeout 30m -run TestBenchMigrateVsRsync ./e2e/ ;;
    burst)
      echo "== burst gateways"
      run burst env SKYBRIDGE_BENCH=1 go test -count=1 -v -timeout 10m -run TestBenchBurstJoin ./e2e/ ;;
    loss)
      echo "== routes under packet loss"
      run loss env SKYBRIDGE_BENCH=1 go test -count=1 -v -timeout 60m -run TestBenchRoutesUnderLoss ./e2e/ ;;
    esac ;;
  *) echo "unknown part $part (micro, scale, dataplane, migrate, footprint, burst, loss)" >&2; exit 2 ;;
  esac
done

echo
echo "================ results: $(nproc) cores, $(date -u +%F), $(( $(date +%s) - started )) s ================"
for part in "${parts[@]}"; do
  [ -f "$out/$part" ] || continue
  echo
  echo "## $part"
  table "$part"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
