variable "namespace" {
  description = "Kubernetes namespace (exists already)."
  type        = string
}

variable "region" {
  description = "AWS region (Secrets Manager, AMP)."
  type        = string
}

variable "gateway_image" {
  description = "Image of the gateway and autoscaler (registry/repository:tag or @sha256:digest)."
  type        = string
}

variable "secrets_role_arn" {
  description = "IAM role of service account shoal-secrets (must be known at plan time)."
  type        = string
}

variable "collector_role_arn" {
  description = "IAM role of service account shoal-otel-collector (must be known at plan time)."
  type        = string
}

variable "redis_secret_name" {
  description = "Secrets Manager secret with the Redis URL (JSON key `url`)."
  type        = string
}

variable "cluster_secret_name" {
  description = "Secrets Manager secret with the cluster secret (JSON keys `secret` and `previous`)."
  type        = string
}

variable "api_keys_secret_key" {
  description = "Name or ARN of the Secrets Manager secret holding the keys file."
  type        = string
}

variable "hf_token_secret_arn" {
  description = "Secrets Manager secret with a Hugging Face token; null for none."
  type        = string
  default     = null
}

variable "model" {
  description = "Model the instances serve (SHOAL_MODEL)."
  type        = string
}

variable "served_model_name" {
  description = "Model name clients use (SHOAL_SERVED_MODEL_NAME); null: the model id."
  type        = string
  default     = null
}

variable "min_instances" {
  description = "SHOAL_MIN_INSTANCES."
  type        = number
}

variable "max_instances" {
  description = "SHOAL_MAX_INSTANCES."
  type        = number
}

variable "tensor_parallel_size" {
  description = "SHOAL_TENSOR_PARALLEL_SIZE: GPUs per instance, passed to every instance; each instance actor asks Ray for this many (SHOAL_RAY_NUM_GPUS)."
  type        = number
}

variable "instance_port" {
  description = "Port of every instance worker when each GPU pod runs one (the scrape annotation's); null lets each pick a free port."
  type        = number
  default     = 8100
}

variable "instance_extra_args" {
  description = "SHOAL_INSTANCE_ARGS: extra `shoal instance` arguments."
  type        = string
  default     = ""
}

variable "gateway_replicas_min" {
  description = "Fewest gateway replicas."
  type        = number
}

variable "gateway_replicas_max" {
  description = "Most gateway replicas."
  type        = number
}

variable "autoscaler_replicas" {
  description = "Autoscaler replicas (one leads)."
  type        = number
  default     = 2
}

variable "amp_remote_write_url" {
  description = "Remote-write URL of the AMP workspace."
  type        = string
}

variable "otlp_traces_endpoint" {
  description = "OTLP/HTTP endpoint for traces; null keeps them in the collector."
  type        = string
  default     = null
}

variable "target_group_arn" {
  description = "NLB target group of the gateway pods."
  type        = string
}

variable "prerequisites" {
  description = "Values whose resources must exist first (add-ons, IAM roles)."
  type        = list(string)
  default     = []
}
