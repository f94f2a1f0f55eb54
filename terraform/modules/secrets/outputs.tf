output "api_keys_secret_arn" {
  description = "Secret holding the gateway keys file."
  value       = local.api_keys_secret_arn
}

output "api_keys_secret_name" {
  description = "Name of the keys-file secret created here (null when api_keys_secret_arn was given)."
  value       = one(aws_secretsmanager_secret.api_keys[*].name)
}

output "admin_api_key_secret_arn" {
  description = "Secret holding the generated admin API key (null when api_keys_secret_arn was given). Read it with `aws secretsmanager get-secret-value`."
  value       = one(aws_secretsmanager_secret.admin_key[*].arn)
}

output "cluster_secret_name" {
  description = "Name of the secret holding the cluster secret (JSON keys `secret` and `previous`)."
  value       = aws_secretsmanager_secret.cluster.name
}

output "cluster_secret_arn" {
  description = "Secret holding the cluster secret (JSON keys `secret` and `previous`)."
  value       = aws_secretsmanager_secret.cluster.arn
}

output "reader_role_arn" {
  description = "IAM role of the External Secrets store's service account."
  value       = aws_iam_role.reader.arn
}
