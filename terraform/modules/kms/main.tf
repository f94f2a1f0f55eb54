# One customer-managed key for the deployment's data at rest: EKS secrets,
# ElastiCache, Secrets Manager, ECR, CloudWatch Logs, AMP and the load
# balancer's access logs. Rotated yearly.

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

data "aws_region" "current" {}

# A key policy: "*" as the resource means this key and nothing else.
data "aws_iam_policy_document" "key" {
  #checkov:skip=CKV_AWS_109:Key policy: the account root statement is AWS's default key policy (delegates to IAM), Resource "*" is this key only
  #checkov:skip=CKV_AWS_111:Key policy: Resource "*" is this key only; service statements are scoped by source account or log-group ARN
  #checkov:skip=CKV_AWS_356:Key policy: Resource "*" is this key only (key policies cannot name their own ARN before it exists)
  # Key administration and use stay with the account's IAM policies.
  statement {
    sid       = "AccountAdministers"
    actions   = ["kms:*"]
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = ["arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }

  # CloudWatch Logs encrypts this account's log groups in this region.
  statement {
    sid = "CloudWatchLogs"
    actions = [
      "kms:Encrypt*",
      "kms:Decrypt*",
      "kms:ReEncrypt*",
      "kms:GenerateDataKey*",
      "kms:Describe*",
    ]
    resources = ["*"]

    principals {
      type        = "Service"
      identifiers = ["logs.${data.aws_region.current.name}.amazonaws.com"]
    }

    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${data.aws_partition.current.partition}:logs:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:log-group:*"]
    }
  }

  # The load balancer's access-log delivery writes SSE-KMS objects.
  statement {
    sid       = "LogDelivery"
    actions   = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"]
    resources = ["*"]

    principals {
      type        = "Service"
      identifiers = ["delivery.logs.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
  }
}

resource "aws_kms_key" "this" {
  description             = "${var.name}: Shoal data at rest"
  enable_key_rotation     = true
  rotation_period_in_days = 365
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.key.json
}

resource "aws_kms_alias" "this" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.this.key_id
}
