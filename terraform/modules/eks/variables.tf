variable "name" {
  description = "Cluster name (and prefix of its IAM roles)."
  type        = string
}

variable "kubernetes_version" {
  description = "EKS Kubernetes version."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets of the control-plane interfaces and the nodes."
  type        = list(string)
}

variable "endpoint_public_access_cidrs" {
  description = "CIDRs allowed to reach the public API endpoint."
  type        = list(string)
}

variable "admin_arns" {
  description = "IAM principals given cluster-admin access (besides the cluster creator)."
  type        = list(string)
  default     = []
}

variable "kms_key_arn" {
  description = "KMS key for Kubernetes secrets and the control-plane log group."
  type        = string
}

variable "log_retention_days" {
  description = "Retention of the control-plane log group."
  type        = number
  default     = 365
}

variable "cpu_instance_types" {
  description = "Instance types of the CPU node group."
  type        = list(string)
}

variable "cpu_nodes_min" {
  description = "Fewest CPU nodes."
  type        = number
}

variable "cpu_nodes_max" {
  description = "Most CPU nodes."
  type        = number
}

variable "gpu_instance_type" {
  description = "Instance type of the GPU node group."
  type        = string
}

variable "gpus_per_node" {
  description = "GPUs of one GPU node."
  type        = number
}

variable "gpu_nodes_max" {
  description = "Most GPU nodes (the group starts at zero)."
  type        = number
}

variable "gpu_node_disk_gb" {
  description = "Root volume of a GPU node, in GB."
  type        = number
}

variable "tags" {
  description = "Tags for node instances, volumes and interfaces (launch templates)."
  type        = map(string)
  default     = {}
}
