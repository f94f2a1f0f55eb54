variable "name" {
  description = "Name prefix of the network resources."
  type        = string
}

variable "cidr" {
  description = "CIDR of the VPC (a /16 is expected: /20 node subnets, /24 public and data subnets)."
  type        = string
}

variable "azs" {
  description = "Availability zones, one subnet of each kind per zone."
  type        = list(string)
}

variable "single_nat_gateway" {
  description = "One NAT gateway for all zones instead of one per zone."
  type        = bool
  default     = true
}

variable "cluster_name" {
  description = "EKS cluster name the node subnets are tagged for."
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key encrypting the flow-log group."
  type        = string
}

variable "log_retention_days" {
  description = "Retention of the flow-log group."
  type        = number
  default     = 365
}
