#!/usr/bin/env bash
# The closest thing to `skybridge demo` until the demo lands (issue 6): build
# skybridge, create a mesh CA, admit the three gateways of the bank example
# (Zurich on-prem, AWS Frankfurt, AWS N. Virginia), show what each is
# certified for, then revoke one and watch it be refused. Everything lives
# in a temporary directory that is removed at the end (KEEP=1 keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d -t skybridge-quickstart-XXXXXX)
cleanup() { if [ -z "${KEEP:-}" ]; then rm -rf "$work"; else echo "kept $work"; fi; }
trap cleanup EXIT

go build -o "$work/skybridge" ./cmd/skybridge
sb() { echo "\$ skybridge $*" | sed "s#$work/##g"; "$work/skybridge" "$@"; echo; }

sb ca init --dir "$work/ca" --mesh-cidr 100.96.0.0/16
sb ca issue --ca "$work/ca" --node gw-zrh-1 --site onprem-zrh --region zrh-dc1 --provider onprem \
  --jurisdiction CH --overlay-ip 100.96.0.1 --route 10.1.0.0/16 --label classes=swiss-banking-secret,pii-eu --out "$work/gw-zrh-1"
sb ca issue --ca "$work/ca" --node gw-fra-1 --site aws-eu-central-1 --region eu-central-1 --provider aws \
  --jurisdiction DE --overlay-ip 100.96.0.2 --route 10.2.0.0/16 --label classes=pii-eu,risk-batch --out "$work/gw-fra-1"
sb ca issue --ca "$work/ca" --node gw-iad-1 --site aws-us-east-1 --region us-east-1 --provider aws \
  --jurisdiction US --overlay-ip 100.96.0.3 --route 10.3.0.0/16 --label classes=risk-batch --out "$work/gw-iad-1"
sb ca list --ca "$work/ca"
sb identity show --dir "$work/gw-fra-1"

echo "# gw-iad-1's key is compromised: revoke it and hand the new list to the gateway"
sb ca revoke --ca "$work/ca" --node gw-iad-1 --reason keyCompromise
cp "$work/ca/crl.pem" "$work/gw-iad-1/crl.pem"
echo "\$ skybridge identity show --dir gw-iad-1"
if "$work/skybridge" identity show --dir "$work/gw-iad-1"; then
  echo "expected the revoked identity to be refused" >&2
  exit 1
fi
echo
echo "quickstart finished: the mesh CA admitted three gateways and refuses the revoked one"
