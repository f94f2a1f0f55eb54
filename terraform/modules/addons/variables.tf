variable "cluster_name" {
  description = "EKS cluster name."
  type        = string
}

variable "region" {
  description = "AWS region of the cluster."
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

variable "node_group_arns" {
  description = "Managed node groups the cluster autoscaler may describe."
  type        = list(string)
}

variable "asg_names" {
  description = "Auto Scaling groups the cluster autoscaler may resize."
  type        = list(string)
}

variable "chart_versions" {
  description = "Helm chart versions: cluster_autoscaler, nvidia_device_plugin, metrics_server, external_secrets."
  type        = map(string)
}
