# Ray for the instance workers: the KubeRay operator and the RayCluster of
# infra/deploy/ray, whose GPU worker group starts at zero and grows to
# gpu_workers_max as the Shoal autoscaler (`--provider ray`) starts instance
# actors; Ray's own autoscaler adds the worker pods, the cluster autoscaler the
# GPU nodes under them.

locals {
  manifests = "${path.module}/../../../infra/deploy/ray"

  # registry/repository[:tag][@sha256:digest]
  image_pattern = "^(?P<name>[^@]+?)(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[a-f0-9]{64}))?$"
  images = {
    shoal-gateway  = regex(local.image_pattern, var.head_image)
    shoal-instance = regex(local.image_pattern, var.worker_image)
  }

  # InstanceSettings (infra/settings.py) of the `shoal instance` processes:
  # the GPU settings explicit (docs/ENGINE.md); the KV cache in bytes only
  # when given, else vLLM fills gpu_memory_utilization of each GPU.
  instance_settings = merge(
    {
      SHOAL_MAX_MODEL_LEN          = tostring(var.max_model_len)
      SHOAL_MAX_NUM_SEQS           = tostring(var.max_num_seqs)
      SHOAL_TENSOR_PARALLEL_SIZE   = tostring(var.tensor_parallel_size)
      SHOAL_GPU_MEMORY_UTILIZATION = tostring(var.gpu_memory_utilization)
    },
    var.kv_cache_bytes == null ? {} : { SHOAL_KV_CACHE_BYTES = tostring(var.kv_cache_bytes) },
  )

  # The worker group: one pod per GPU node, all of its GPUs.
  cluster_patch = [
    { op = "replace", path = "/spec/rayVersion", value = var.ray_version },
    { op = "replace", path = "/spec/workerGroupSpecs/0/minReplicas", value = 0 },
    { op = "replace", path = "/spec/workerGroupSpecs/0/maxReplicas", value = var.gpu_workers_max },
    {
      op    = "replace"
      path  = "/spec/workerGroupSpecs/0/template/spec/containers/0/resources/limits/nvidia.com~1gpu"
      value = tostring(var.gpus_per_worker)
    },
  ]
}

resource "terraform_data" "prerequisites" {
  input = var.prerequisites
}

resource "helm_release" "kuberay_operator" {
  name             = "kuberay-operator"
  namespace        = "kuberay-system"
  create_namespace = true
  repository       = "https://ray-project.github.io/kuberay-helm/"
  chart            = "kuberay-operator"
  version          = var.operator_chart_version
  wait             = true

  values = [yamlencode({
    nodeSelector = { "shoal.dev/pool" = "cpu" }
    resources = {
      requests = { cpu = "100m", memory = "256Mi" }
      limits   = { cpu = "500m", memory = "512Mi" }
    }
  })]

  depends_on = [terraform_data.prerequisites]
}

data "kustomization_overlay" "ray" {
  resources = [local.manifests]
  namespace = var.namespace

  dynamic "images" {
    for_each = local.images

    content {
      name     = images.key
      new_name = images.value.name
      new_tag  = try(coalesce(images.value.tag), null)
      digest   = try(coalesce(images.value.digest), null)
    }
  }

  config_map_generator {
    name     = "shoal-instance"
    behavior = "merge"
    literals = [for k, v in local.instance_settings : "${k}=${v}"]
  }

  patches {
    patch = jsonencode(local.cluster_patch)

    target {
      group = "ray.io"
      kind  = "RayCluster"
      name  = "shoal-ray"
    }
  }
}

resource "kustomization_resource" "p0" {
  for_each = data.kustomization_overlay.ray.ids_prio[0]

  manifest = data.kustomization_overlay.ray.manifests[each.value]

  depends_on = [helm_release.kuberay_operator]
}

resource "kustomization_resource" "p1" {
  for_each = data.kustomization_overlay.ray.ids_prio[1]

  manifest = data.kustomization_overlay.ray.manifests[each.value]

  depends_on = [kustomization_resource.p0]
}

resource "kustomization_resource" "p2" {
  for_each = data.kustomization_overlay.ray.ids_prio[2]

  manifest = data.kustomization_overlay.ray.manifests[each.value]

  depends_on = [kustomization_resource.p1]
}
