# API keys, the cluster secret and the read-only identity that syncs secrets
# into the cluster.
#
# Keys file (docs/KEYS.md): either an existing Secrets Manager secret
# (api_keys_secret_arn), or one created here holding a generated admin key as
# a SHA-256 digest, its plaintext kept in a second secret for the operator
# (`aws secretsmanager get-secret-value`). Neither appears in an output or a
# variable; like every Terraform-generated secret, the generated key is in the
# state, which must be stored encrypted (examples/backend.tf.example).
#
# Cluster secret (docs/SECURITY.md): generated here, JSON {secret, previous}
# (previous empty but present: the External Secret reads both properties);
# the gateway and autoscaler read it, the autoscaler hands it on to the
# instances. Rotate it with the two-secret procedure (infra/deploy/README.md,
# "Cluster secret") by writing new versions with the AWS CLI, not by tainting
# the random_password: that would drop the old secret in one step.
#
# The IAM role of service account `<namespace>/<service_account>` (IRSA) may
# read exactly the secrets listed, and decrypt only through Secrets Manager.

data "aws_region" "current" {}

locals {
  create_keys = var.api_keys_secret_arn == null
}

resource "random_password" "admin_key" {
  count = local.create_keys ? 1 : 0

  length  = 40
  special = false
}

resource "aws_secretsmanager_secret" "api_keys" {
  #checkov:skip=CKV2_AWS_57:A keys file changes when keys are added or revoked by the operator (docs/KEYS.md); there is nothing for a rotation Lambda to rotate
  count = local.create_keys ? 1 : 0

  name                    = "${var.name}/api-keys"
  description             = "Shoal: gateway keys file (SHOAL_KEYS_FILE, docs/KEYS.md)"
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = var.secret_recovery_window_days
}

resource "aws_secretsmanager_secret_version" "api_keys" {
  count = local.create_keys ? 1 : 0

  secret_id = aws_secretsmanager_secret.api_keys[0].id
  secret_string = jsonencode({
    keys = [{
      name         = "admin"
      sha256       = sha256("sk-shoal-${random_password.admin_key[0].result}")
      max_priority = "high"
    }]
  })
}

resource "aws_secretsmanager_secret" "admin_key" {
  #checkov:skip=CKV2_AWS_57:The admin key is the operator's bootstrap credential; replace it by editing the keys file (or taint random_password.admin_key), not by a rotation Lambda
  count = local.create_keys ? 1 : 0

  name                    = "${var.name}/admin-api-key"
  description             = "Shoal: the generated admin API key (Authorization: Bearer ...)"
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = var.secret_recovery_window_days
}

resource "aws_secretsmanager_secret_version" "admin_key" {
  count = local.create_keys ? 1 : 0

  secret_id     = aws_secretsmanager_secret.admin_key[0].id
  secret_string = "sk-shoal-${random_password.admin_key[0].result}"
}

resource "random_password" "cluster_secret" {
  length  = 48
  special = false
}

resource "aws_secretsmanager_secret" "cluster" {
  #checkov:skip=CKV2_AWS_57:The cluster secret rotates with the two-secret procedure (docs/SECURITY.md, infra/deploy/README.md): every member accepts the current and the previous secret and is restarted onto the new one; a rotation Lambda cannot restart the gateways, autoscaler and instances
  name                    = "${var.name}/cluster-secret"
  description             = "Shoal: cluster secret of internal calls (SHOAL_CLUSTER_SECRET, SHOAL_CLUSTER_SECRET_PREVIOUS)"
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = var.secret_recovery_window_days
}

resource "aws_secretsmanager_secret_version" "cluster" {
  secret_id = aws_secretsmanager_secret.cluster.id
  secret_string = jsonencode({
    secret   = random_password.cluster_secret.result
    previous = ""
  })
}

locals {
  api_keys_secret_arn = local.create_keys ? aws_secretsmanager_secret.api_keys[0].arn : var.api_keys_secret_arn
  readable_arns = concat(var.readable_secret_arns, [
    local.api_keys_secret_arn,
    aws_secretsmanager_secret.cluster.arn,
  ])
}

# ------------------------------------------------------ reader role (IRSA) ---

data "aws_iam_policy_document" "assume" {
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

resource "aws_iam_role" "reader" {
  name               = var.role_name
  assume_role_policy = data.aws_iam_policy_document.assume.json
}

data "aws_iam_policy_document" "read" {
  statement {
    sid       = "ReadShoalSecrets"
    actions   = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
    resources = local.readable_arns
  }

  statement {
    sid       = "DecryptThroughSecretsManager"
    actions   = ["kms:Decrypt"]
    resources = [var.kms_key_arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["secretsmanager.${data.aws_region.current.name}.amazonaws.com"]
    }
  }
}

resource "aws_iam_role_policy" "read" {
  name   = "read-shoal-secrets"
  role   = aws_iam_role.reader.id
  policy = data.aws_iam_policy_document.read.json
}
