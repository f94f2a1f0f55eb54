output "repository_urls" {
  description = "Repository URLs by image (gateway, instance): push the images here."
  value       = { for k, r in aws_ecr_repository.this : k => r.repository_url }
}
