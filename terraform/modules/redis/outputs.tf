output "primary_endpoint" {
  description = "Primary endpoint host (TLS, port 6379). Not a secret: connecting needs the AUTH token."
  value       = aws_elasticache_replication_group.this.primary_endpoint_address
}

output "url_secret_arn" {
  description = "Secrets Manager secret holding the Redis URL (JSON key `url`)."
  value       = aws_secretsmanager_secret.url.arn
}

output "url_secret_name" {
  description = "Name of the Redis URL secret."
  value       = aws_secretsmanager_secret.url.name
}

output "security_group_id" {
  description = "Security group of the replication group."
  value       = aws_security_group.this.id
}
