# Shoal's Kubernetes side on EKS: infra/deploy/overlays/aws (gateway,
# autoscaler, collector, network policies, External Secrets store) with this
# deployment's images, settings, IAM roles and secret names patched in. The
# manifests live in infra/deploy so that they serve without Terraform too.
#
# Every input of the overlay below is known at plan time (the resources are
# keyed by manifest); values only known after apply (the target group ARN,
# the AMP URL) go into the few objects created separately at the end.

locals {
  overlay = "${path.module}/../../../infra/deploy/overlays/aws"

  # registry/repository[:tag][@sha256:digest]
  image = regex("^(?P<name>[^@]+?)(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[a-f0-9]{64}))?$", var.gateway_image)

  # A fixed port for the one instance of a GPU pod (the collector scrapes it);
  # it follows the provider's own --port, so it wins.
  port_args = var.instance_port == null ? "" : "--port ${var.instance_port}"

  # AutoscalerSettings (infra/settings.py), merged over the base ConfigMap.
  autoscaler_settings = merge(
    {
      SHOAL_MODEL         = var.model
      SHOAL_MIN_INSTANCES = tostring(var.min_instances)
      SHOAL_MAX_INSTANCES = tostring(var.max_instances)
      # One GPU per tensor-parallel rank of each instance.
      SHOAL_TENSOR_PARALLEL_SIZE = tostring(var.tensor_parallel_size)
      SHOAL_RAY_NUM_GPUS         = tostring(var.tensor_parallel_size)
      SHOAL_INSTANCE_ARGS        = trimspace(join(" ", [local.port_args, var.instance_extra_args]))
    },
    var.served_model_name == null ? {} : { SHOAL_SERVED_MODEL_NAME = var.served_model_name },
  )

  json_patches = {
    gateway_replicas = {
      target = { group = "apps", kind = "Deployment", name = "shoal-gateway" }
      ops    = [{ op = "replace", path = "/spec/replicas", value = var.gateway_replicas_min }]
    }
    gateway_hpa = {
      target = { group = "autoscaling", kind = "HorizontalPodAutoscaler", name = "shoal-gateway" }
      ops = [
        { op = "replace", path = "/spec/minReplicas", value = var.gateway_replicas_min },
        { op = "replace", path = "/spec/maxReplicas", value = var.gateway_replicas_max },
      ]
    }
    autoscaler_replicas = {
      target = { group = "apps", kind = "Deployment", name = "shoal-autoscaler" }
      ops    = [{ op = "replace", path = "/spec/replicas", value = var.autoscaler_replicas }]
    }
    secrets_role = {
      target = { group = "", kind = "ServiceAccount", name = "shoal-secrets" }
      ops    = [{ op = "replace", path = "/metadata/annotations/eks.amazonaws.com~1role-arn", value = var.secrets_role_arn }]
    }
    collector_role = {
      target = { group = "", kind = "ServiceAccount", name = "shoal-otel-collector" }
      ops    = [{ op = "replace", path = "/metadata/annotations/eks.amazonaws.com~1role-arn", value = var.collector_role_arn }]
    }
    secret_store_region = {
      target = { group = "external-secrets.io", kind = "SecretStore", name = "aws-secrets-manager" }
      ops    = [{ op = "replace", path = "/spec/provider/aws/region", value = var.region }]
    }
    redis_secret = {
      target = { group = "external-secrets.io", kind = "ExternalSecret", name = "shoal-redis" }
      ops    = [{ op = "replace", path = "/spec/data/0/remoteRef/key", value = var.redis_secret_name }]
    }
    cluster_secret = {
      target = { group = "external-secrets.io", kind = "ExternalSecret", name = "shoal-cluster" }
      ops = [
        { op = "replace", path = "/spec/data/0/remoteRef/key", value = var.cluster_secret_name },
        { op = "replace", path = "/spec/data/1/remoteRef/key", value = var.cluster_secret_name },
      ]
    }
    api_keys_secret = {
      target = { group = "external-secrets.io", kind = "ExternalSecret", name = "shoal-api-keys" }
      ops    = [{ op = "replace", path = "/spec/data/0/remoteRef/key", value = var.api_keys_secret_key }]
    }
  }

  # Forward traces when there is somewhere to forward them to.
  traces_patch = var.otlp_traces_endpoint == null ? {} : {
    collector_traces = {
      target = { group = "apps", kind = "Deployment", name = "shoal-otel-collector" }
      ops    = [{ op = "add", path = "/spec/template/spec/containers/0/args/-", value = "--config=/conf/traces-otlp.yaml" }]
    }
  }
}

data "kustomization_overlay" "shoal" {
  resources = [local.overlay]
  namespace = var.namespace

  # The overlay reads the collector configuration from infra/deploy, above it.
  kustomize_options {
    load_restrictor = "none"
  }

  images {
    name     = "shoal-gateway"
    new_name = local.image.name
    new_tag  = try(coalesce(local.image.tag), null)
    digest   = try(coalesce(local.image.digest), null)
  }

  config_map_generator {
    name     = "shoal-autoscaler"
    behavior = "merge"
    literals = [for k, v in local.autoscaler_settings : "${k}=${v}"]
  }

  dynamic "patches" {
    for_each = merge(local.json_patches, local.traces_patch)

    content {
      patch = jsonencode(patches.value.ops)

      target {
        group = patches.value.target.group
        kind  = patches.value.target.kind
        name  = patches.value.target.name
      }
    }
  }
}

resource "terraform_data" "prerequisites" {
  input = var.prerequisites
}

# Namespaces and CRDs first, then everything else, then webhooks.
resource "kustomization_resource" "p0" {
  for_each = data.kustomization_overlay.shoal.ids_prio[0]

  manifest = data.kustomization_overlay.shoal.manifests[each.value]

  depends_on = [terraform_data.prerequisites]
}

resource "kustomization_resource" "p1" {
  for_each = data.kustomization_overlay.shoal.ids_prio[1]

  manifest = data.kustomization_overlay.shoal.manifests[each.value]

  depends_on = [kustomization_resource.p0]
}

resource "kustomization_resource" "p2" {
  for_each = data.kustomization_overlay.shoal.ids_prio[2]

  manifest = data.kustomization_overlay.shoal.manifests[each.value]

  depends_on = [kustomization_resource.p1]
}

# ------------------------------------------ objects with values from apply ---

# Read by the collector (envFrom in the overlay).
resource "kubernetes_config_map_v1" "otel_aws" {
  metadata {
    name      = "shoal-otel-aws"
    namespace = var.namespace
    labels = {
      "app.kubernetes.io/name"      = "shoal"
      "app.kubernetes.io/component" = "otel-collector"
      "app.kubernetes.io/part-of"   = "shoal"
    }
  }

  data = merge(
    {
      AWS_REGION           = var.region
      AMP_REMOTE_WRITE_URL = var.amp_remote_write_url
    },
    var.otlp_traces_endpoint == null ? {} : { OTLP_TRACES_ENDPOINT = var.otlp_traces_endpoint },
  )

  depends_on = [terraform_data.prerequisites]
}

# The gateway pods are the NLB target group's members (AWS Load Balancer
# Controller). No `networking` block: the security group rule is Terraform's.
resource "kustomization_resource" "target_group_binding" {
  manifest = jsonencode({
    apiVersion = "elbv2.k8s.aws/v1beta1"
    kind       = "TargetGroupBinding"
    metadata = {
      name      = "shoal-gateway"
      namespace = var.namespace
      labels = {
        "app.kubernetes.io/name"      = "shoal"
        "app.kubernetes.io/component" = "gateway"
        "app.kubernetes.io/part-of"   = "shoal"
      }
    }
    spec = {
      serviceRef     = { name = "shoal-gateway", port = 8000 }
      targetGroupARN = var.target_group_arn
      targetType     = "ip"
    }
  })

  depends_on = [kustomization_resource.p1]
}

# Hugging Face token for gated models (secret `shoal-hf-token`, key `token`,
# read by the Ray GPU workers).
resource "kustomization_resource" "hf_token" {
  count = var.hf_token_secret_arn == null ? 0 : 1

  manifest = jsonencode({
    apiVersion = "external-secrets.io/v1"
    kind       = "ExternalSecret"
    metadata = {
      name      = "shoal-hf-token"
      namespace = var.namespace
      labels = {
        "app.kubernetes.io/name"      = "shoal"
        "app.kubernetes.io/component" = "secrets"
        "app.kubernetes.io/part-of"   = "shoal"
      }
    }
    spec = {
      refreshInterval = "1h"
      secretStoreRef  = { kind = "SecretStore", name = "aws-secrets-manager" }
      target          = { name = "shoal-hf-token", creationPolicy = "Owner" }
      data            = [{ secretKey = "token", remoteRef = { key = var.hf_token_secret_arn } }]
    }
  })

  depends_on = [kustomization_resource.p1]
}
