# The sites of the bank's mesh, as their gateways' certificates describe
# them. `skybridge policy explain` and the policy tests judge the policy
# against them.

site "onprem-zrh" {
  provider     = "onprem"
  region       = "zrh-dc1"
  jurisdiction = "CH"
  labels       = { classes = "swiss-banking-secret,pii-eu,risk-batch,public", zone = "zrh-a" }
}

site "onprem-gva" {
  provider     = "onprem"
  region       = "gva-dc2"
  jurisdiction = "CH"
  labels       = { classes = "swiss-banking-secret,pii-eu,risk-batch,public", zone = "gva-a" }
}

site "aws-eu-central-1" {
  provider     = "aws"
  region       = "eu-central-1"
  jurisdiction = "DE"
  labels       = { classes = "pii-eu,risk-batch,public", certified = "iso27001,pci-dss" }
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
  labels       = { classes = "risk-batch,public", certified = "iso27001" }
}

site "azure-eastus-burst" {
  provider     = "azure"
  region       = "eastus"
  jurisdiction = "US"
  labels       = { classes = "risk-batch" }
}
