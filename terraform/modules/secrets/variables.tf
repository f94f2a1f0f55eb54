variable "name" {
  description = "Name prefix of the secrets."
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key encrypting the secrets created here (and decryptable by the reader)."
  type        = string
}

variable "api_keys_secret_arn" {
  description = "Existing secret holding the keys file (full ARN); null creates one with a generated admin key."
  type        = string
  default     = null
}

variable "readable_secret_arns" {
  description = "Other secrets the reader role may read (the Redis URL, a Hugging Face token)."
  type        = list(string)
  default     = []
}

variable "oidc_provider_arn" {
  description = "IAM OIDC provider of the cluster."
  type        = string
}

variable "oidc_issuer" {
  description = "OIDC issuer without https://."
  type        = string
}

variable "namespace" {
  description = "Kubernetes namespace of the reader service account."
  type        = string
}

variable "service_account" {
  description = "Service account the External Secrets store authenticates as."
  type        = string
}

variable "role_name" {
  description = "Name of the reader IAM role."
  type        = string
}

variable "secret_recovery_window_days" {
  description = "Days a deleted secret stays recoverable (its name is reserved meanwhile)."
  type        = number
  default     = 7
}
