# The sites of the bank's mesh, as their gateways' certificates describe
# them. `skybridge policy explain` and the policy tests judge the policy
# against them.
#
# The labels encryption_at_rest, replica_zones and zone attest what a
# site's storage provides, and meet the policy's `require` blocks: the
# bank's racks keep every image on encrypted volumes mirrored to a second
# zone of the same datacenter; the AWS regions store on encrypted EBS
# volumes.

site "onprem-zrh" {
  provider     = "onprem"
  region       = "zrh-dc1"
  jurisdiction = "CH"
  labels       = { classes = "swiss-banking-secret,pii-eu,risk-batch,public", zone = "zrh-a", encryption_at_rest = "true", replica_zones = "2" }
}

site "onprem-gva" {
  provider     = "onprem"
  region       = "gva-dc2"
  jurisdiction = "CH"
  labels       = { classes = "swiss-banking-secret,pii-eu,risk-batch,public", zone = "gva-a", encryption_at_rest = "true", replica_zones = "2" }
}

site "aws-eu-central-1" {
  provider     = "aws"
  region       = "eu-central-1"
  jurisdiction = "DE"
  labels       = { classes = "pii-eu,risk-batch,public", certified = "iso27001,pci-dss", encryption_at_rest = "true" }
}

site "gcp-europe-west6" {
  provider     = "gcp"
  region       = "europe-west6"
  jurisdiction = "CH"
  labels       = { classes = "risk-batch,public", certified = "iso27001", tenancy = "shared" }
}

site "aws-us-east-1" {
  provider     = "aws"
  region       = "us-east-1"
  jurisdiction = "US"
  labels       = { classes = "risk-batch,public", certified = "iso27001", encryption_at_rest = "true" }
}

site "azure-eastus-burst" {
  provider     = "azure"
  region       = "eastus"
  jurisdiction = "US"
  labels       = { classes = "risk-batch" }
}
