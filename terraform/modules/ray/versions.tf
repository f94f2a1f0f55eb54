terraform {
  required_version = ">= 1.6.0"

  required_providers {
    helm = {
      source  = "hashicorp/helm"
      version = ">= 2.17, < 3.0"
    }
    kustomization = {
      source  = "kbst/kustomization"
      version = ">= 0.9.6, < 1.0"
    }
  }
}
