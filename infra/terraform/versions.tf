terraform {
  required_version = ">= 1.5"
  required_providers {
    google = {
      source = "hashicorp/google"
      # The version whose schema the module is checked against (tests/tests/infra.rs).
      version = "~> 6.50"
    }
  }
}

provider "google" {
  project = var.project
  region  = var.region
}
