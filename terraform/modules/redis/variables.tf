variable "name" {
  description = "Name prefix of the Redis resources."
  type        = string
}

variable "vpc_id" {
  description = "VPC of the replication group."
  type        = string
}

variable "subnet_ids" {
  description = "Private data subnets (one per zone)."
  type        = list(string)
}

variable "client_security_group_id" {
  description = "Security group allowed to connect (the EKS cluster security group)."
  type        = string
}

variable "node_type" {
  description = "ElastiCache node type."
  type        = string
}

variable "replicas" {
  description = "Replicas besides the primary, in other zones (automatic failover needs at least one)."
  type        = number
  default     = 1

  validation {
    condition     = var.replicas >= 1 && var.replicas <= 5
    error_message = "replicas must be between 1 and 5."
  }
}

variable "engine_version" {
  description = "Valkey engine version."
  type        = string
  default     = "8.0"
}

variable "parameter_group_name" {
  description = "Parameter group of the engine version (cluster mode off)."
  type        = string
  default     = "default.valkey8"
}

variable "kms_key_arn" {
  description = "KMS key for data at rest, the URL secret and the log groups."
  type        = string
}

variable "log_retention_days" {
  description = "Retention of the slow-log and engine-log groups."
  type        = number
  default     = 365
}

variable "secret_recovery_window_days" {
  description = "Days a deleted URL secret stays recoverable (its name is reserved meanwhile)."
  type        = number
  default     = 7
}
