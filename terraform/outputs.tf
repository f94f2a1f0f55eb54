# No output carries a secret: the Redis URL, the AUTH token, the cluster secret
# and the API keys stay in Secrets Manager (read them with the AWS CLI, see
# README.md).

output "gateway_url" {
  description = "OpenAI-compatible base URL of the gateway (TLS)."
  value       = "${module.ingress.gateway_url}/v1"
}

output "load_balancer_dns_name" {
  description = "DNS name of the gateway's load balancer (domain_name points here)."
  value       = module.ingress.load_balancer_dns_name
}

output "cluster_name" {
  description = "Name of the EKS cluster."
  value       = module.eks.cluster_name
}

output "kubeconfig_command" {
  description = "Command that writes a kubeconfig entry for the cluster."
  value       = "aws eks update-kubeconfig --region ${var.region} --name ${module.eks.cluster_name}"
}

output "redis_endpoint" {
  description = "Primary endpoint of the ElastiCache replication group (TLS; the AUTH token is in Secrets Manager)."
  value       = module.redis.primary_endpoint
}

output "redis_url_secret_arn" {
  description = "Secrets Manager secret holding SHOAL_REDIS_URL (JSON key `url`)."
  value       = module.redis.url_secret_arn
}

output "api_keys_secret_arn" {
  description = "Secrets Manager secret holding the gateway's keys file."
  value       = module.secrets.api_keys_secret_arn
}

output "admin_api_key_secret_arn" {
  description = "Secrets Manager secret holding the generated admin API key (null when api_keys_secret_arn was given)."
  value       = module.secrets.admin_api_key_secret_arn
}

output "cluster_secret_arn" {
  description = "Secrets Manager secret holding the cluster secret (JSON keys `secret` and `previous`; rotation: infra/deploy/README.md)."
  value       = module.secrets.cluster_secret_arn
}

output "ecr_repository_urls" {
  description = "Where to push the gateway and instance images (README.md)."
  value       = module.registry.repository_urls
}

output "prometheus_endpoint" {
  description = "Query endpoint of the Amazon Managed Service for Prometheus workspace (SigV4)."
  value       = module.observability.prometheus_endpoint
}

output "images" {
  description = "Images the cluster runs."
  value = {
    gateway  = local.gateway_image
    instance = local.instance_image
  }
}
