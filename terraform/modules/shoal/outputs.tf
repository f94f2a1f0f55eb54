output "ready" {
  description = "Depends on every applied manifest (secrets, settings): pass it to what needs them."
  value       = jsonencode(concat(keys(kustomization_resource.p1), [kustomization_resource.target_group_binding.id]))
}

output "manifest_ids" {
  description = "Ids of the applied manifests."
  value       = concat(keys(kustomization_resource.p0), keys(kustomization_resource.p1), keys(kustomization_resource.p2))
}
