output "target_group_arn" {
  description = "Target group of the gateway pods (bound by a TargetGroupBinding)."
  value       = aws_lb_target_group.gateway.arn
}

output "load_balancer_dns_name" {
  description = "DNS name of the load balancer."
  value       = aws_lb.this.dns_name
}

output "gateway_url" {
  description = "HTTPS URL of the gateway."
  value       = "https://${var.domain_name}"
}

output "ready" {
  description = "Changes once the load balancer controller is installed."
  value       = helm_release.lbc.id
}
