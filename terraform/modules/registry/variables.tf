variable "repositories" {
  description = "Repository names by image (gateway, instance)."
  type        = map(string)
}

variable "kms_key_arn" {
  description = "KMS key encrypting the images."
  type        = string
}

variable "force_delete" {
  description = "Let `terraform destroy` delete repositories that still hold images."
  type        = bool
  default     = true
}
