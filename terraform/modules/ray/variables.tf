variable "namespace" {
  description = "Kubernetes namespace of the Ray cluster (the Shoal namespace)."
  type        = string
}

variable "operator_chart_version" {
  description = "Version of the kuberay-operator Helm chart."
  type        = string
}

variable "ray_version" {
  description = "Ray version; equal to the Ray in both images."
  type        = string
}

variable "head_image" {
  description = "Image of the Ray head (the gateway image: Shoal and Ray, no GPU libraries)."
  type        = string
}

variable "worker_image" {
  description = "Image of the GPU workers (the instance image: CUDA vLLM, Shoal and Ray)."
  type        = string
}

variable "gpu_workers_max" {
  description = "Most GPU worker pods (one per GPU node)."
  type        = number
}

variable "gpus_per_worker" {
  description = "GPUs per worker pod (all of a node's GPUs)."
  type        = number
  default     = 1
}

variable "max_model_len" {
  description = "SHOAL_MAX_MODEL_LEN of the instances."
  type        = number
}

variable "max_num_seqs" {
  description = "SHOAL_MAX_NUM_SEQS of the instances."
  type        = number
}

variable "tensor_parallel_size" {
  description = "SHOAL_TENSOR_PARALLEL_SIZE of the instances: GPUs one instance spans (at most gpus_per_worker)."
  type        = number
}

variable "gpu_memory_utilization" {
  description = "SHOAL_GPU_MEMORY_UTILIZATION of the instances: the share of each GPU vLLM sizes the KV cache into."
  type        = number
}

variable "kv_cache_bytes" {
  description = "SHOAL_KV_CACHE_BYTES of the instances (per GPU); null leaves it unset, so vLLM sizes the cache from gpu_memory_utilization."
  type        = number
}

variable "prerequisites" {
  description = "Values whose resources must exist first (add-ons, the Shoal secrets)."
  type        = list(string)
  default     = []
}
