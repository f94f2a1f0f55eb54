output "workspace_id" {
  description = "Id of the AMP workspace."
  value       = aws_prometheus_workspace.this.id
}

output "prometheus_endpoint" {
  description = "Prometheus-compatible query endpoint of the workspace (SigV4)."
  value       = aws_prometheus_workspace.this.prometheus_endpoint
}

output "remote_write_url" {
  description = "Remote-write URL of the workspace."
  value       = "${aws_prometheus_workspace.this.prometheus_endpoint}api/v1/remote_write"
}

output "collector_role_arn" {
  description = "IAM role of the collector's service account."
  value       = aws_iam_role.collector.arn
}
