terraform {
  required_version = ">= 1.6.0"

  required_providers {
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = ">= 2.36, < 3.0"
    }
    kustomization = {
      source  = "kbst/kustomization"
      version = ">= 0.9.6, < 1.0"
    }
  }
}
