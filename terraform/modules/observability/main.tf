# Metrics: an Amazon Managed Service for Prometheus workspace that the
# in-cluster OpenTelemetry collector (infra/deploy/overlays/aws) remote-writes
# every shoal_* metric to, signed with the collector's IAM role (IRSA), which
# may only write to this workspace. Query it from Amazon Managed Grafana or any
# Grafana with SigV4 (import infra/deploy/grafana-dashboard.json).
# Traces: the collector forwards them to var.otlp_traces_endpoint when set
# (modules/shoal).

resource "aws_cloudwatch_log_group" "amp" {
  name              = "/aws/prometheus/${var.name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key_arn
}

resource "aws_prometheus_workspace" "this" {
  alias       = var.name
  kms_key_arn = var.kms_key_arn

  logging_configuration {
    log_group_arn = "${aws_cloudwatch_log_group.amp.arn}:*"
  }
}

data "aws_iam_policy_document" "collector_assume" {
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }

    condition {
      test     = "StringEquals"
      variable = "${var.oidc_issuer}:sub"
      values   = ["system:serviceaccount:${var.namespace}:${var.service_account}"]
    }

    condition {
      test     = "StringEquals"
      variable = "${var.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "collector" {
  name               = var.role_name
  assume_role_policy = data.aws_iam_policy_document.collector_assume.json
}

data "aws_iam_policy_document" "remote_write" {
  statement {
    sid       = "RemoteWrite"
    actions   = ["aps:RemoteWrite"]
    resources = [aws_prometheus_workspace.this.arn]
  }
}

resource "aws_iam_role_policy" "remote_write" {
  name   = "amp-remote-write"
  role   = aws_iam_role.collector.id
  policy = data.aws_iam_policy_document.remote_write.json
}
