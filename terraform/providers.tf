provider "aws" {
  region = var.region

  # Every taggable resource gets these (node group instances and volumes get
  # them through their launch templates, see modules/eks).
  default_tags {
    tags = local.tags
  }
}

# The Kubernetes-side providers authenticate with short-lived tokens from the
# AWS CLI (`aws eks get-token`), never with a stored credential. The identity
# running Terraform is made cluster admin when the cluster is created
# (modules/eks: bootstrap_cluster_creator_admin_permissions).
provider "kubernetes" {
  host                   = module.eks.cluster_endpoint
  cluster_ca_certificate = base64decode(module.eks.cluster_certificate_authority)

  exec {
    api_version = "client.authentication.k8s.io/v1beta1"
    command     = "aws"
    args        = ["eks", "get-token", "--cluster-name", module.eks.cluster_name, "--region", var.region]
  }
}

provider "helm" {
  kubernetes {
    host                   = module.eks.cluster_endpoint
    cluster_ca_certificate = base64decode(module.eks.cluster_certificate_authority)

    exec {
      api_version = "client.authentication.k8s.io/v1beta1"
      command     = "aws"
      args        = ["eks", "get-token", "--cluster-name", module.eks.cluster_name, "--region", var.region]
    }
  }
}

provider "kustomization" {
  kubeconfig_raw = local.kubeconfig
}
