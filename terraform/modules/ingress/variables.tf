variable "name" {
  description = "Name prefix of the load balancer resources."
  type        = string
}

variable "region" {
  description = "AWS region."
  type        = string
}

variable "vpc_id" {
  description = "VPC of the load balancer and the cluster."
  type        = string
}

variable "vpc_cidr" {
  description = "CIDR of the VPC (the load balancer's egress to the pods)."
  type        = string
}

variable "public_subnet_ids" {
  description = "Public subnets of the load balancer."
  type        = list(string)
}

variable "cluster_name" {
  description = "EKS cluster name (for the load balancer controller)."
  type        = string
}

variable "cluster_security_group_id" {
  description = "Security group of the nodes and pods (the gateway's port is opened to the load balancer there)."
  type        = string
}

variable "oidc_provider_arn" {
  description = "IAM OIDC provider of the cluster."
  type        = string
}

variable "oidc_issuer" {
  description = "OIDC issuer without https://."
  type        = string
}

variable "domain_name" {
  description = "DNS name of the gateway."
  type        = string
}

variable "route53_zone_id" {
  description = "Route 53 zone of domain_name."
  type        = string
}

variable "allowed_client_cidrs" {
  description = "CIDRs allowed to connect on 443."
  type        = list(string)
}

variable "kms_key_arn" {
  description = "KMS key of the access-log bucket."
  type        = string
}

variable "access_log_retention_days" {
  description = "Days access logs are kept."
  type        = number
  default     = 90
}

variable "deletion_protection" {
  description = "Deletion protection on the load balancer (turn it off before `terraform destroy`)."
  type        = bool
  default     = false
}

variable "lbc_chart_version" {
  description = "Version of the aws-load-balancer-controller Helm chart."
  type        = string
}

variable "wait_for" {
  description = "Install the controller only after this value is known (the cluster add-ons)."
  type        = string
  default     = ""
}
