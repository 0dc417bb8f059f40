# Residency policy of a Swiss private bank with EU clients that bursts its
# risk computations to the public cloud.
#
# Read it top to bottom: who counts as "EU", which cloud regions the bank
# has approved, then one block per class of data saying where it may be
# stored and where it may travel. Anything not allowed here is forbidden.

policy {
  name        = "acme-bank-residency"
  version     = 1
  mode        = "enforce"
  description = "Approved by the Data Governance Board on 2026-11-20 (minutes DGB-2026-11)."
}

# --- Where -----------------------------------------------------------------

jurisdiction "EU" {
  description = "The 27 member states of the European Union."
  countries = ["AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE",
  "IT", "LV", "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE"]
}

jurisdiction "EEA" {
  description = "European Economic Area: the EU plus Iceland, Liechtenstein and Norway."
  countries   = ["EU", "IS", "LI", "NO"]
}

jurisdiction "GDPR-ADEQUATE" {
  description = "EEA plus Switzerland, which has an EU adequacy decision."
  countries   = ["EEA", "CH"]
}

selector "approved-cloud" {
  description = "Cloud regions that passed the bank's vendor assessment."
  provider    = ["aws", "gcp", "azure"]
  labels      = { certified = "iso27001" }
}

selector "own-datacenter" {
  description = "The bank's own racks."
  provider    = ["onprem"]
}

# --- What ------------------------------------------------------------------

class "swiss-banking-secret" {
  description = "Client-identifying data under Swiss banking secrecy (Art. 47 BankG). It never leaves Switzerland or the bank's own racks."

  allow "store" {
    jurisdiction = ["CH"]
    selector     = "own-datacenter"
    reason       = "banking secrecy: own racks in Switzerland only"
    require {
      encryption_at_rest = true
      min_replica_zones  = 2
    }
  }

  allow "transit" {
    jurisdiction = ["CH"]
    selector     = "own-datacenter"
    require {
      max_hops = 1
    }
  }
}

class "pii-eu" {
  description = "Personal data of EU residents (GDPR). Stays in the EEA or Switzerland and only travels through sites there."

  allow "store" {
    jurisdiction = ["GDPR-ADEQUATE"]
    reason       = "GDPR: EEA or adequate country"
    require {
      encryption_at_rest = true
    }
  }

  allow "transit" {
    jurisdiction = ["GDPR-ADEQUATE"]
  }

  deny "store" {
    labels = { tenancy = "shared" }
    reason = "personal data is not stored on shared-tenancy hosts (DPIA-2026-07)"
  }
}

class "risk-batch" {
  description = "Pseudonymised inputs and results of the monthly risk run. May burst to any approved cloud region."

  allow "store" {
    selector = "approved-cloud"
  }

  allow "store" {
    selector = "own-datacenter"
  }

  allow "transit" {
    selector = "approved-cloud"
  }

  allow "transit" {
    selector = "own-datacenter"
  }

  deny "store" {
    jurisdiction = ["CN", "RU", "IR", "KP"]
    reason       = "sanctions and export-control screening (Compliance Directive 12)"
  }
}

class "public" {
  description = "Published material: market commentary, product sheets."

  allow "store" {
    site = ["*"]
  }

  allow "transit" {
    site = ["*"]
  }
}

# --- Dated exceptions --------------------------------------------------------

# A disaster-recovery rehearsal copies pseudonymised EU records to the US
# region for December. Storing them there and carrying them there are two
# actions, so the waiver names both.

exception "pii-eu-dr-rehearsal-us-store" {
  class    = "pii-eu"
  action   = "store"
  site     = ["aws-us-east-1"]
  category = "mitigated"
  reason   = "Disaster-recovery rehearsal with pseudonymised records; keys stay in the EU HSM"
  approver = "Chief Data Officer"
  ticket   = "GRC-2041"
  expires  = "2026-12-31"
}

exception "pii-eu-dr-rehearsal-us-transit" {
  class    = "pii-eu"
  action   = "transit"
  site     = ["aws-us-east-1"]
  category = "mitigated"
  reason   = "Disaster-recovery rehearsal with pseudonymised records; keys stay in the EU HSM"
  approver = "Chief Data Officer"
  ticket   = "GRC-2041"
  expires  = "2026-12-31"
}
