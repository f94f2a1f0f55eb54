output "ready" {
  description = "Changes once every add-on is installed; pass it to resources that need them."
  value = join(",", [
    helm_release.cluster_autoscaler.id,
    helm_release.nvidia_device_plugin.id,
    helm_release.metrics_server.id,
    helm_release.external_secrets.id,
  ])
}

output "cluster_autoscaler_role_arn" {
  description = "IAM role of the cluster autoscaler."
  value       = aws_iam_role.cluster_autoscaler.arn
}
