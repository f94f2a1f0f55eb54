# ---------------------------------------------------------------- general ---

variable "name" {
  description = "Name of the deployment: prefix of every AWS resource and the EKS cluster name."
  type        = string
  default     = "shoal"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,18}[a-z0-9]$", var.name))
    error_message = "name: 3-20 characters, lower-case letters, digits and '-', starting with a letter."
  }
}

variable "region" {
  description = "AWS region."
  type        = string
  default     = "us-east-1"
}

variable "environment" {
  description = "Environment tag (prod, staging, ...)."
  type        = string
  default     = "prod"
}

variable "tags" {
  description = "Extra tags for every resource (merged into the provider's default_tags)."
  type        = map(string)
  default     = {}
}

variable "log_retention_days" {
  description = "Retention of CloudWatch log groups (EKS control plane, VPC flow logs, Redis, AMP)."
  type        = number
  default     = 365
}

# ---------------------------------------------------------------- network ---

variable "vpc_cidr" {
  description = "CIDR of the VPC (split into public, private node and private data subnets)."
  type        = string
  default     = "10.42.0.0/16"
}

variable "az_count" {
  description = "Availability zones to use (2 or 3)."
  type        = number
  default     = 3

  validation {
    condition     = var.az_count >= 2 && var.az_count <= 3
    error_message = "az_count must be 2 or 3."
  }
}

variable "single_nat_gateway" {
  description = "One NAT gateway for all zones (cheaper) instead of one per zone (survives a zone outage)."
  type        = bool
  default     = true
}

# ------------------------------------------------------------- kubernetes ---

variable "kubernetes_version" {
  description = "EKS Kubernetes version."
  type        = string
  default     = "1.33"
}

variable "cluster_endpoint_public_access_cidrs" {
  description = "CIDRs allowed to reach the Kubernetes API endpoint: where you run terraform and kubectl from. Nodes use the private endpoint."
  type        = list(string)

  validation {
    condition     = length(var.cluster_endpoint_public_access_cidrs) > 0 && !contains(var.cluster_endpoint_public_access_cidrs, "0.0.0.0/0")
    error_message = "Give at least one CIDR, and not 0.0.0.0/0."
  }
}

variable "cluster_admin_arns" {
  description = "IAM principals (users or roles) given cluster-admin access, besides the identity that runs Terraform."
  type        = list(string)
  default     = []
}

variable "cpu_instance_types" {
  description = "Instance types of the CPU node group (gateway, autoscaler, Ray head, add-ons)."
  type        = list(string)
  default     = ["m6i.xlarge"]
}

variable "cpu_nodes_min" {
  description = "Fewest CPU nodes."
  type        = number
  default     = 2
}

variable "cpu_nodes_max" {
  description = "Most CPU nodes (the cluster autoscaler adds nodes as gateway replicas grow)."
  type        = number
  default     = 6
}

variable "gpu_instance_type" {
  description = "Instance type of the GPU node group (one Ray worker pod per node)."
  type        = string
  default     = "g5.xlarge"
}

variable "gpus_per_node" {
  description = "GPUs of one gpu_instance_type node (g5.xlarge: 1)."
  type        = number
  default     = 1
}

variable "gpu_nodes_max" {
  description = "Most GPU nodes. The GPU node group and the Ray GPU worker group both scale from zero up to this."
  type        = number
  default     = 4

  validation {
    condition     = var.gpu_nodes_max >= 1
    error_message = "gpu_nodes_max must be at least 1."
  }
}

variable "gpu_node_disk_gb" {
  description = "Root volume of a GPU node, in GB (the vLLM image and the model weights live there)."
  type        = number
  default     = 200
}

# ------------------------------------------------------------------ shoal ---

variable "model" {
  description = "Hugging Face model id the instances serve."
  type        = string
  default     = "Qwen/Qwen2.5-7B-Instruct"
}

variable "served_model_name" {
  description = "Model name clients ask for (default: model)."
  type        = string
  default     = null
}

variable "max_model_len" {
  description = "Longest sequence (prompt + output) per request."
  type        = number
  default     = 8192
}

variable "max_num_seqs" {
  description = "Largest batch per instance."
  type        = number
  default     = 128
}

# The GPU settings of the instances, in one place: both the autoscaler (GPUs
# per instance actor) and the instances (vLLM's arguments) get them from here.

variable "tensor_parallel_size" {
  description = "GPUs one instance spans (vLLM tensor parallelism, SHOAL_TENSOR_PARALLEL_SIZE); each instance actor asks Ray for this many. Must divide gpus_per_node."
  type        = number
  default     = 1

  validation {
    condition     = var.tensor_parallel_size >= 1 && floor(var.tensor_parallel_size) == var.tensor_parallel_size
    error_message = "tensor_parallel_size must be a whole number >= 1."
  }
}

variable "gpu_memory_utilization" {
  description = "Share of each GPU's memory vLLM may use (SHOAL_GPU_MEMORY_UTILIZATION); the KV cache gets what the weights and activations leave of it. vLLM's default."
  type        = number
  default     = 0.92

  validation {
    condition     = var.gpu_memory_utilization > 0 && var.gpu_memory_utilization <= 1
    error_message = "gpu_memory_utilization must be in (0, 1]."
  }
}

variable "kv_cache_bytes" {
  description = "KV-cache bytes per GPU (SHOAL_KV_CACHE_BYTES), overriding gpu_memory_utilization; null lets vLLM size the cache."
  type        = number
  default     = null
}

variable "min_instances" {
  description = "Fewest instances the autoscaler keeps. 0 scales to zero when idle (the first request then waits for a GPU node: several minutes)."
  type        = number
  default     = 1
}

variable "max_instances" {
  description = "Most instances (at most gpu_nodes_max * gpus_per_node / tensor_parallel_size)."
  type        = number
  default     = 4
}

variable "instance_extra_args" {
  description = "Extra `shoal instance` arguments for every instance (SHOAL_INSTANCE_ARGS), e.g. \"--block-size 16\"."
  type        = string
  default     = ""
}

variable "gateway_replicas_min" {
  description = "Fewest gateway replicas (the horizontal pod autoscaler's floor)."
  type        = number
  default     = 3
}

variable "gateway_replicas_max" {
  description = "Most gateway replicas."
  type        = number
  default     = 12
}

variable "autoscaler_replicas" {
  description = "Autoscaler replicas: one leads (Redis lease), the others stand by."
  type        = number
  default     = 2
}

variable "image_tag" {
  description = "Tag of the Shoal images pushed to this deployment's ECR repositories (see README.md)."
  type        = string
  default     = "0.1.0"
}

variable "gateway_image" {
  description = "Full gateway/autoscaler/Ray head image reference; null uses this deployment's ECR repository with image_tag."
  type        = string
  default     = null
}

variable "instance_image" {
  description = "Full instance (CUDA vLLM) image reference; null uses this deployment's ECR repository with image_tag."
  type        = string
  default     = null
}

variable "ray_version" {
  description = "Ray version of the cluster; must equal the Ray installed in both images (RAY_VERSION build argument)."
  type        = string
  default     = "2.60.0"
}

# ------------------------------------------------------------------ redis ---

variable "redis_node_type" {
  description = "ElastiCache node type of the state store."
  type        = string
  default     = "cache.t4g.medium"
}

variable "redis_replicas" {
  description = "Replicas besides the primary, in other zones (1-5; automatic failover needs one)."
  type        = number
  default     = 1

  validation {
    condition     = var.redis_replicas >= 1 && var.redis_replicas <= 5
    error_message = "redis_replicas must be between 1 and 5."
  }
}

# ------------------------------------------------------------- edge / auth ---

variable "domain_name" {
  description = "DNS name of the gateway (e.g. llm.example.com), in the Route 53 zone route53_zone_id."
  type        = string
}

variable "route53_zone_id" {
  description = "Route 53 hosted zone for domain_name (the TLS certificate is validated through it)."
  type        = string
}

variable "deletion_protection" {
  description = "Deletion protection on the gateway's load balancer (turn it off before `terraform destroy`)."
  type        = bool
  default     = false
}

variable "allowed_client_cidrs" {
  description = "CIDRs allowed to reach the gateway's load balancer (HTTPS, port 443)."
  type        = list(string)

  validation {
    condition     = length(var.allowed_client_cidrs) > 0
    error_message = "Give at least one CIDR (0.0.0.0/0 for a public API: every request still needs an API key)."
  }
}

variable "api_keys_secret_arn" {
  description = "Existing Secrets Manager secret (full ARN, encrypted with aws/secretsmanager or this deployment's key) whose value is a Shoal keys file (docs/KEYS.md). null: create one holding a generated admin key (its plaintext in a second secret)."
  type        = string
  default     = null
}

variable "hf_token_secret_arn" {
  description = "Secrets Manager secret (full ARN, encrypted with aws/secretsmanager or this deployment's key) holding a Hugging Face token as a plain string, for gated models; null for none."
  type        = string
  default     = null
}

# ---------------------------------------------------------- observability ---

variable "otlp_traces_endpoint" {
  description = "OTLP/HTTP endpoint the collector forwards Shoal's traces to (e.g. https://tempo.example.com:4318); null keeps them in the collector."
  type        = string
  default     = null
}

# ------------------------------------------------------------ helm charts ---

variable "chart_versions" {
  description = "Helm chart versions of the cluster add-ons (merged over the pinned defaults)."
  type        = map(string)
  default     = {}
}
