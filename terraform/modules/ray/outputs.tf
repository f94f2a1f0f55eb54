output "head_service" {
  description = "Service of the Ray head (the autoscaler connects to ray://<this>:10001)."
  value       = "shoal-ray-head-svc"
}

output "manifest_ids" {
  description = "Ids of the applied manifests."
  value       = concat(keys(kustomization_resource.p0), keys(kustomization_resource.p1), keys(kustomization_resource.p2))
}
