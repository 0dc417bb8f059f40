# Tests of residency.hcl against the bank's sites. Run them with
#   skybridge policy test docs/examples/residency_test.hcl

policy    = "residency.hcl"
inventory = "sites.hcl"
at        = "2026-11-24T12:00:00Z"

# A third Swiss rack, to test paths of more than one hop. Its storage is
# neither encrypted nor mirrored (yet).
site "onprem-bsl" {
  provider     = "onprem"
  region       = "bsl-dc3"
  jurisdiction = "CH"
}

test "swiss banking secrets are stored in our Swiss racks" {
  class  = "swiss-banking-secret"
  action = "store"
  sites  = ["onprem-zrh"]
  expect = "allow"
}

test "swiss banking secrets are not stored where the storage is not attested as encrypted" {
  class         = "swiss-banking-secret"
  action        = "store"
  sites         = ["onprem-bsl"]
  expect        = "deny"
  expect_reason = "does not attest (label encryption_at_rest"
}

test "swiss banking secrets never go to a cloud, even a Swiss one" {
  class         = "swiss-banking-secret"
  action        = "store"
  sites         = ["gcp-europe-west6"]
  expect        = "deny"
  expect_reason = "denied by default"
}

test "swiss banking secrets never reach the US" {
  class  = "swiss-banking-secret"
  action = "store"
  sites  = ["aws-us-east-1"]
  expect = "deny"
}

test "swiss banking secrets travel directly between Swiss racks" {
  class  = "swiss-banking-secret"
  action = "transit"
  sites  = ["onprem-zrh", "onprem-gva"]
  expect = "allow"
}

test "swiss banking secrets do not take detours" {
  class         = "swiss-banking-secret"
  action        = "transit"
  sites         = ["onprem-zrh", "onprem-bsl", "onprem-gva"]
  expect        = "deny"
  expect_reason = "has 2 hops"
}

test "EU personal data may be stored in Frankfurt, encrypted" {
  class       = "pii-eu"
  action      = "store"
  sites       = ["aws-eu-central-1"]
  expect      = "allow"
  expect_rule = "residency.hcl:71"
}

test "EU personal data may be stored in Zurich (adequacy)" {
  class  = "pii-eu"
  action = "store"
  sites  = ["onprem-zrh"]
  expect = "allow"
}

test "EU personal data travels only through EU or adequate sites" {
  class  = "pii-eu"
  action = "transit"
  sites  = ["onprem-zrh", "aws-eu-central-1"]
  expect = "allow"
}

test "deny beats allow: no EU personal data on shared tenancy" {
  class         = "pii-eu"
  action        = "store"
  sites         = ["gcp-europe-west6"]
  expect        = "deny"
  expect_rule   = "residency.hcl:83"
  expect_reason = "shared-tenancy"
}

test "EU personal data may go to the US for the DR rehearsal" {
  class            = "pii-eu"
  action           = "store"
  sites            = ["aws-us-east-1"]
  expect           = "allow"
  expect_exception = "pii-eu-dr-rehearsal-us-store"
}

test "the DR waiver ends with December" {
  class         = "pii-eu"
  action        = "store"
  sites         = ["aws-us-east-1"]
  at            = "2027-01-01T00:00:00Z"
  expect        = "deny"
  expect_reason = "expired"
}

test "the DR waiver does not cover other US regions" {
  class  = "pii-eu"
  action = "store"
  sites  = ["azure-eastus-burst"]
  expect = "deny"
}

test "risk batches burst to an approved US region" {
  class  = "risk-batch"
  action = "store"
  sites  = ["aws-us-east-1"]
  expect = "allow"
}

test "risk batches do not go to an unassessed cloud" {
  class  = "risk-batch"
  action = "store"
  sites  = ["azure-eastus-burst"]
  expect = "deny"
}

test "unknown classes are denied" {
  class         = "trading-secrets"
  action        = "store"
  sites         = ["onprem-zrh"]
  expect        = "deny"
  expect_reason = "not defined"
}

test "public data goes anywhere" {
  class  = "public"
  action = "transit"
  sites  = ["onprem-zrh", "aws-eu-central-1", "azure-eastus-burst"]
  expect = "allow"
}
