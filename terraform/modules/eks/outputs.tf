output "cluster_name" {
  description = "Name of the EKS cluster."
  value       = aws_eks_cluster.this.name
}

output "cluster_endpoint" {
  description = "Kubernetes API endpoint."
  value       = aws_eks_cluster.this.endpoint
}

output "cluster_certificate_authority" {
  description = "Base64 CA certificate of the API endpoint."
  value       = aws_eks_cluster.this.certificate_authority[0].data
}

output "cluster_security_group_id" {
  description = "The EKS-managed cluster security group (control plane and managed nodes)."
  value       = aws_eks_cluster.this.vpc_config[0].cluster_security_group_id
}

output "oidc_provider_arn" {
  description = "IAM OIDC provider of the cluster (IRSA)."
  value       = aws_iam_openid_connect_provider.this.arn
}

output "oidc_issuer" {
  description = "OIDC issuer host and path, without https:// (IRSA condition keys)."
  value       = local.oidc_issuer
}

output "node_group_arns" {
  description = "ARNs of the managed node groups."
  value       = [aws_eks_node_group.cpu.arn, aws_eks_node_group.gpu.arn]
}

output "node_group_asg_names" {
  description = "Auto Scaling groups behind the managed node groups (the cluster autoscaler resizes these)."
  value = concat(
    aws_eks_node_group.cpu.resources[0].autoscaling_groups[*].name,
    aws_eks_node_group.gpu.resources[0].autoscaling_groups[*].name,
  )
}
