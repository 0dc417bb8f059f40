#!/usr/bin/env bash
# The closest thing to `skybridge demo` until the demo lands (issue 6): build
# skybridge, create a mesh CA, admit the three gateways of the bank example
# (Zurich on-prem, AWS Frankfurt, AWS N. Virginia), show what each is
# certified for, revoke one and watch it be refused; then sign the bank's
# residency policy and ask it where data may go. Everything lives in a
# temporary directory that is removed at the end (KEEP=1 keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d -t skybridge-quickstart-XXXXXX)
cleanup() { if [ -z "${KEEP:-}" ]; then rm -rf "$work"; else echo "kept $work"; fi; }
trap cleanup EXIT

go build -o "$work/skybridge" ./cmd/skybridge
cp docs/examples/residency.hcl docs/examples/sites.hcl "$work/"
cd "$work"

sb() { echo "\$ skybridge $*"; ./skybridge "$@"; echo; }
# refused runs a command that must fail (exit 1) and stops if it does not.
refused() { echo "\$ skybridge $*"; if ./skybridge "$@"; then echo "expected a refusal" >&2; exit 1; fi; echo; }

sb ca init --dir ca --mesh-cidr 100.96.0.0/16
sb ca issue --ca ca --node gw-zrh-1 --site onprem-zrh --region zrh-dc1 --provider onprem \
  --jurisdiction CH --overlay-ip 100.96.0.1 --route 10.1.0.0/16 --label classes=swiss-banking-secret,pii-eu --out gw-zrh-1
sb ca issue --ca ca --node gw-fra-1 --site aws-eu-central-1 --region eu-central-1 --provider aws \
  --jurisdiction DE --overlay-ip 100.96.0.2 --route 10.2.0.0/16 --label classes=pii-eu,risk-batch --out gw-fra-1
sb ca issue --ca ca --node gw-iad-1 --site aws-us-east-1 --region us-east-1 --provider aws \
  --jurisdiction US --overlay-ip 100.96.0.3 --route 10.3.0.0/16 --label classes=risk-batch --out gw-iad-1
sb ca list --ca ca
sb identity show --dir gw-fra-1

echo "# gw-iad-1's key is compromised: revoke it and hand the new list to the gateway"
sb ca revoke --ca ca --node gw-iad-1 --reason keyCompromise
cp ca/crl.pem gw-iad-1/crl.pem
refused identity show --dir gw-iad-1

echo "# the residency policy, signed by the mesh CA, decides where each class of data may go"
sb policy sign --policy residency.hcl --ca ca
sb policy verify --policy residency.hcl --ca-cert ca/ca.crt
sb policy check --policy residency.hcl --inventory sites.hcl --class pii-eu --action store --site aws-eu-central-1
refused policy check --policy residency.hcl --inventory sites.hcl --class swiss-banking-secret --action store --site aws-us-east-1
sb policy explain --policy residency.hcl --inventory sites.hcl --class swiss-banking-secret

echo "quickstart finished: the mesh CA admitted three gateways and refuses the revoked one;"
echo "the signed residency policy keeps Swiss banking secrets in Swiss racks"
