# Cluster add-ons Shoal relies on:
#   cluster-autoscaler     adds a GPU node when a Ray GPU worker pod is pending
#                          and removes idle nodes (GPU group from zero)
#   nvidia-device-plugin   advertises nvidia.com/gpu on GPU nodes
#   metrics-server         CPU metrics for the gateway's HorizontalPodAutoscaler
#   external-secrets       syncs Secrets Manager secrets into Kubernetes secrets
#                          (the Shoal namespace's own store; the controller
#                          itself has no AWS permissions)

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

# -------------------------------------------------------- cluster-autoscaler ---

data "aws_iam_policy_document" "cluster_autoscaler_assume" {
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }

    condition {
      test     = "StringEquals"
      variable = "${var.oidc_issuer}:sub"
      values   = ["system:serviceaccount:kube-system:cluster-autoscaler"]
    }

    condition {
      test     = "StringEquals"
      variable = "${var.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "cluster_autoscaler" {
  name               = "${var.cluster_name}-cluster-autoscaler"
  assume_role_policy = data.aws_iam_policy_document.cluster_autoscaler_assume.json
}

# Read-only discovery everywhere (these actions have no resource-level
# permissions); resizing only this cluster's node groups.
data "aws_iam_policy_document" "cluster_autoscaler" {
  statement {
    sid = "Discover"
    actions = [
      "autoscaling:DescribeAutoScalingGroups",
      "autoscaling:DescribeAutoScalingInstances",
      "autoscaling:DescribeLaunchConfigurations",
      "autoscaling:DescribeScalingActivities",
      "autoscaling:DescribeTags",
      "ec2:DescribeImages",
      "ec2:DescribeInstanceTypes",
      "ec2:DescribeLaunchTemplateVersions",
      "ec2:GetInstanceTypesFromInstanceRequirements",
    ]
    resources = ["*"]
  }

  statement {
    sid       = "DescribeNodeGroups"
    actions   = ["eks:DescribeNodegroup"]
    resources = var.node_group_arns
  }

  statement {
    sid = "Resize"
    actions = [
      "autoscaling:SetDesiredCapacity",
      "autoscaling:TerminateInstanceInAutoScalingGroup",
    ]
    resources = [
      for asg in var.asg_names :
      "arn:${data.aws_partition.current.partition}:autoscaling:${var.region}:${data.aws_caller_identity.current.account_id}:autoScalingGroup:*:autoScalingGroupName/${asg}"
    ]

    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/k8s.io/cluster-autoscaler/${var.cluster_name}"
      values   = ["owned"]
    }
  }
}

resource "aws_iam_role_policy" "cluster_autoscaler" {
  name   = "cluster-autoscaler"
  role   = aws_iam_role.cluster_autoscaler.id
  policy = data.aws_iam_policy_document.cluster_autoscaler.json
}

resource "helm_release" "cluster_autoscaler" {
  name       = "cluster-autoscaler"
  namespace  = "kube-system"
  repository = "https://kubernetes.github.io/autoscaler"
  chart      = "cluster-autoscaler"
  version    = var.chart_versions["cluster_autoscaler"]
  wait       = true

  values = [yamlencode({
    cloudProvider = "aws"
    awsRegion     = var.region
    autoDiscovery = { clusterName = var.cluster_name }
    rbac = {
      serviceAccount = {
        name        = "cluster-autoscaler"
        annotations = { "eks.amazonaws.com/role-arn" = aws_iam_role.cluster_autoscaler.arn }
      }
    }
    extraArgs = {
      "balance-similar-node-groups"   = true
      "skip-nodes-with-system-pods"   = false
      "skip-nodes-with-local-storage" = false
      "expander"                      = "least-waste"
      # GPU nodes are expensive: give them back soon after Ray releases them.
      "scale-down-unneeded-time"   = "5m"
      "scale-down-delay-after-add" = "5m"
    }
    nodeSelector = { "shoal.dev/pool" = "cpu" }
    resources = {
      requests = { cpu = "100m", memory = "300Mi" }
      limits   = { cpu = "500m", memory = "600Mi" }
    }
    podDisruptionBudget = { maxUnavailable = 1 }
  })]

  depends_on = [aws_iam_role_policy.cluster_autoscaler]
}

# ----------------------------------------------------- nvidia-device-plugin ---

resource "helm_release" "nvidia_device_plugin" {
  name       = "nvidia-device-plugin"
  namespace  = "kube-system"
  repository = "https://nvidia.github.io/k8s-device-plugin"
  chart      = "nvidia-device-plugin"
  version    = var.chart_versions["nvidia_device_plugin"]
  wait       = false

  values = [yamlencode({
    nodeSelector = { "shoal.dev/pool" = "gpu" }
    tolerations = [{
      key      = "nvidia.com/gpu"
      operator = "Exists"
      effect   = "NoSchedule"
    }]
  })]
}

# ------------------------------------------------------------ metrics-server ---

resource "helm_release" "metrics_server" {
  name       = "metrics-server"
  namespace  = "kube-system"
  repository = "https://kubernetes-sigs.github.io/metrics-server"
  chart      = "metrics-server"
  version    = var.chart_versions["metrics_server"]
  wait       = true

  values = [yamlencode({
    nodeSelector = { "shoal.dev/pool" = "cpu" }
  })]
}

# ---------------------------------------------------------- external-secrets ---

resource "helm_release" "external_secrets" {
  name             = "external-secrets"
  namespace        = "external-secrets"
  create_namespace = true
  repository       = "https://charts.external-secrets.io"
  chart            = "external-secrets"
  version          = var.chart_versions["external_secrets"]
  wait             = true

  values = [yamlencode({
    installCRDs  = true
    nodeSelector = { "shoal.dev/pool" = "cpu" }
    webhook      = { nodeSelector = { "shoal.dev/pool" = "cpu" } }
    certController = {
      nodeSelector = { "shoal.dev/pool" = "cpu" }
    }
  })]
}
