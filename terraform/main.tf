# Shoal on AWS: a VPC, an EKS cluster with a CPU node group (gateway,
# autoscaler, Ray head, add-ons) and a GPU node group that scales from zero,
# ElastiCache (Valkey) for shared state, KubeRay with a GPU worker group that
# the autoscaler's `ray` provider fills, the gateway behind a TLS NLB, secrets
# in Secrets Manager and metrics in Amazon Managed Service for Prometheus.

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

data "aws_availability_zones" "available" {
  #checkov:skip=CKV_AWS_394:The zones used are the first az_count names in sorted order (local.azs); AWS gives new zones later letters, so a new zone never changes the selection
  state = "available"

  filter {
    name   = "opt-in-status"
    values = ["opt-in-not-required"]
  }
}

locals {
  tags = merge({
    Project     = "shoal"
    Deployment  = var.name
    Environment = var.environment
    ManagedBy   = "terraform"
  }, var.tags)

  azs        = slice(sort(data.aws_availability_zones.available.names), 0, var.az_count)
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  namespace  = "shoal"

  # Role names and image references are fixed here, from known values, so that
  # every Kubernetes manifest is known at plan time (the kustomization
  # resources are keyed by manifest).
  irsa_role_names = {
    secrets   = "${var.name}-shoal-secrets"
    collector = "${var.name}-otel-collector"
  }
  irsa_role_arns = { for k, n in local.irsa_role_names : k => "arn:${local.partition}:iam::${local.account_id}:role/${n}" }

  repositories = {
    gateway  = "${var.name}/gateway"
    instance = "${var.name}/instance"
  }
  registry       = "${local.account_id}.dkr.ecr.${var.region}.${data.aws_partition.current.dns_suffix}"
  gateway_image  = coalesce(var.gateway_image, "${local.registry}/${local.repositories.gateway}:${var.image_tag}")
  instance_image = coalesce(var.instance_image, "${local.registry}/${local.repositories.instance}:${var.image_tag}")

  chart_versions = merge({
    kuberay_operator             = "1.4.2"
    cluster_autoscaler           = "9.46.6"
    aws_load_balancer_controller = "1.13.0"
    external_secrets             = "0.19.2"
    nvidia_device_plugin         = "0.17.1"
    metrics_server               = "3.12.2"
  }, var.chart_versions)

  # For the kustomization provider, which takes a kubeconfig (same exec
  # authentication as the kubernetes and helm providers).
  kubeconfig = yamlencode({
    apiVersion = "v1"
    kind       = "Config"
    clusters = [{
      name = module.eks.cluster_name
      cluster = {
        server                     = module.eks.cluster_endpoint
        certificate-authority-data = module.eks.cluster_certificate_authority
      }
    }]
    users = [{
      name = "terraform"
      user = {
        exec = {
          apiVersion = "client.authentication.k8s.io/v1beta1"
          command    = "aws"
          args       = ["eks", "get-token", "--cluster-name", module.eks.cluster_name, "--region", var.region]
        }
      }
    }]
    contexts = [{
      name    = "terraform"
      context = { cluster = module.eks.cluster_name, user = "terraform" }
    }]
    current-context = "terraform"
  })
}

resource "terraform_data" "checks" {
  input = var.max_instances

  lifecycle {
    precondition {
      condition     = var.max_instances * var.tensor_parallel_size <= var.gpu_nodes_max * var.gpus_per_node
      error_message = "max_instances (${var.max_instances}) x tensor_parallel_size (${var.tensor_parallel_size}) must be <= gpu_nodes_max * gpus_per_node (${var.gpu_nodes_max * var.gpus_per_node})."
    }
    precondition {
      condition     = var.gpus_per_node % var.tensor_parallel_size == 0
      error_message = "tensor_parallel_size (${var.tensor_parallel_size}) must divide gpus_per_node (${var.gpus_per_node}): an instance runs on the GPUs of one node."
    }
    precondition {
      condition     = var.min_instances <= var.max_instances
      error_message = "min_instances (${var.min_instances}) must be <= max_instances (${var.max_instances})."
    }
    precondition {
      condition     = var.gateway_replicas_min <= var.gateway_replicas_max
      error_message = "gateway_replicas_min (${var.gateway_replicas_min}) must be <= gateway_replicas_max (${var.gateway_replicas_max})."
    }
  }
}

module "kms" {
  source = "./modules/kms"

  name = var.name
}

module "network" {
  source = "./modules/network"

  name               = var.name
  cidr               = var.vpc_cidr
  azs                = local.azs
  single_nat_gateway = var.single_nat_gateway
  cluster_name       = var.name
  kms_key_arn        = module.kms.key_arn
  log_retention_days = var.log_retention_days
}

module "eks" {
  source = "./modules/eks"

  name                         = var.name
  kubernetes_version           = var.kubernetes_version
  subnet_ids                   = module.network.private_subnet_ids
  endpoint_public_access_cidrs = var.cluster_endpoint_public_access_cidrs
  admin_arns                   = var.cluster_admin_arns
  kms_key_arn                  = module.kms.key_arn
  log_retention_days           = var.log_retention_days
  cpu_instance_types           = var.cpu_instance_types
  cpu_nodes_min                = var.cpu_nodes_min
  cpu_nodes_max                = var.cpu_nodes_max
  gpu_instance_type            = var.gpu_instance_type
  gpus_per_node                = var.gpus_per_node
  gpu_nodes_max                = var.gpu_nodes_max
  gpu_node_disk_gb             = var.gpu_node_disk_gb
  tags                         = local.tags
}

module "registry" {
  source = "./modules/registry"

  repositories = local.repositories
  kms_key_arn  = module.kms.key_arn
}

module "redis" {
  source = "./modules/redis"

  name                     = var.name
  vpc_id                   = module.network.vpc_id
  subnet_ids               = module.network.data_subnet_ids
  client_security_group_id = module.eks.cluster_security_group_id
  node_type                = var.redis_node_type
  replicas                 = var.redis_replicas
  kms_key_arn              = module.kms.key_arn
  log_retention_days       = var.log_retention_days
}

module "secrets" {
  source = "./modules/secrets"

  name                = var.name
  kms_key_arn         = module.kms.key_arn
  api_keys_secret_arn = var.api_keys_secret_arn
  readable_secret_arns = compact([
    module.redis.url_secret_arn,
    var.hf_token_secret_arn,
  ])
  oidc_provider_arn = module.eks.oidc_provider_arn
  oidc_issuer       = module.eks.oidc_issuer
  namespace         = local.namespace
  service_account   = "shoal-secrets"
  role_name         = local.irsa_role_names.secrets
}

module "observability" {
  source = "./modules/observability"

  name               = var.name
  kms_key_arn        = module.kms.key_arn
  log_retention_days = var.log_retention_days
  oidc_provider_arn  = module.eks.oidc_provider_arn
  oidc_issuer        = module.eks.oidc_issuer
  namespace          = local.namespace
  service_account    = "shoal-otel-collector"
  role_name          = local.irsa_role_names.collector
}

module "addons" {
  source = "./modules/addons"

  cluster_name      = module.eks.cluster_name
  region            = var.region
  oidc_provider_arn = module.eks.oidc_provider_arn
  oidc_issuer       = module.eks.oidc_issuer
  node_group_arns   = module.eks.node_group_arns
  asg_names         = module.eks.node_group_asg_names
  chart_versions    = local.chart_versions
}

module "ingress" {
  source = "./modules/ingress"

  name                      = var.name
  region                    = var.region
  vpc_id                    = module.network.vpc_id
  vpc_cidr                  = var.vpc_cidr
  public_subnet_ids         = module.network.public_subnet_ids
  cluster_name              = module.eks.cluster_name
  cluster_security_group_id = module.eks.cluster_security_group_id
  oidc_provider_arn         = module.eks.oidc_provider_arn
  oidc_issuer               = module.eks.oidc_issuer
  domain_name               = var.domain_name
  route53_zone_id           = var.route53_zone_id
  allowed_client_cidrs      = var.allowed_client_cidrs
  deletion_protection       = var.deletion_protection
  kms_key_arn               = module.kms.key_arn
  lbc_chart_version         = local.chart_versions.aws_load_balancer_controller
  wait_for                  = module.addons.ready
}

# Pod Security: baseline enforced (KubeRay's injected containers do not all
# meet `restricted`); Shoal's own pods meet `restricted`, which is audited.
resource "kubernetes_namespace_v1" "shoal" {
  metadata {
    name = local.namespace
    labels = {
      "app.kubernetes.io/part-of"          = "shoal"
      "pod-security.kubernetes.io/enforce" = "baseline"
      "pod-security.kubernetes.io/audit"   = "restricted"
      "pod-security.kubernetes.io/warn"    = "restricted"
    }
  }

  depends_on = [module.eks]
}

module "shoal" {
  source = "./modules/shoal"

  namespace            = kubernetes_namespace_v1.shoal.metadata[0].name
  region               = var.region
  gateway_image        = local.gateway_image
  secrets_role_arn     = local.irsa_role_arns.secrets
  collector_role_arn   = local.irsa_role_arns.collector
  redis_secret_name    = module.redis.url_secret_name
  cluster_secret_name  = module.secrets.cluster_secret_name
  api_keys_secret_key  = coalesce(var.api_keys_secret_arn, module.secrets.api_keys_secret_name)
  hf_token_secret_arn  = var.hf_token_secret_arn
  model                = var.model
  served_model_name    = var.served_model_name
  min_instances        = var.min_instances
  max_instances        = var.max_instances
  tensor_parallel_size = var.tensor_parallel_size
  instance_port        = var.gpus_per_node == var.tensor_parallel_size ? 8100 : null
  instance_extra_args  = var.instance_extra_args
  gateway_replicas_min = var.gateway_replicas_min
  gateway_replicas_max = var.gateway_replicas_max
  autoscaler_replicas  = var.autoscaler_replicas
  amp_remote_write_url = module.observability.remote_write_url
  otlp_traces_endpoint = var.otlp_traces_endpoint
  target_group_arn     = module.ingress.target_group_arn
  prerequisites = [
    module.addons.ready,
    module.ingress.ready,
    module.secrets.reader_role_arn,
    module.observability.collector_role_arn,
  ]
}

module "ray" {
  source = "./modules/ray"

  namespace              = kubernetes_namespace_v1.shoal.metadata[0].name
  operator_chart_version = local.chart_versions.kuberay_operator
  ray_version            = var.ray_version
  head_image             = local.gateway_image
  worker_image           = local.instance_image
  gpu_workers_max        = var.gpu_nodes_max
  gpus_per_worker        = var.gpus_per_node
  max_model_len          = var.max_model_len
  max_num_seqs           = var.max_num_seqs
  tensor_parallel_size   = var.tensor_parallel_size
  gpu_memory_utilization = var.gpu_memory_utilization
  kv_cache_bytes         = var.kv_cache_bytes
  prerequisites          = [module.addons.ready, module.shoal.ready]
}
