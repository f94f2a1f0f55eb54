variable "name" {
  description = "Alias of the workspace."
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key of the workspace and its log group."
  type        = string
}

variable "log_retention_days" {
  description = "Retention of the workspace's log group."
  type        = number
  default     = 365
}

variable "oidc_provider_arn" {
  description = "IAM OIDC provider of the cluster."
  type        = string
}

variable "oidc_issuer" {
  description = "OIDC issuer without https://."
  type        = string
}

variable "namespace" {
  description = "Kubernetes namespace of the collector."
  type        = string
}

variable "service_account" {
  description = "Service account of the collector."
  type        = string
}

variable "role_name" {
  description = "Name of the collector's IAM role."
  type        = string
}
