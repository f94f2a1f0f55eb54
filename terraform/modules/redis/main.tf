# Shoal's shared state (instance registry, load reports, reservations, leases,
# keys, rate limits): ElastiCache for Valkey with one shard (Shoal's Lua
# scripts touch keys across slots, so cluster mode is off), replicas in
# other zones with automatic failover, TLS required in transit, encrypted at
# rest with the deployment key, and an AUTH token. Only the EKS nodes' security
# group may connect. Pods get the URL (`rediss://:<token>@<primary>:6379/0`)
# from Secrets Manager; Terraform never outputs it.

resource "aws_elasticache_subnet_group" "this" {
  name        = "${var.name}-redis"
  description = "Shoal state store (private data subnets)"
  subnet_ids  = var.subnet_ids
}

resource "aws_security_group" "this" {
  name        = "${var.name}-redis"
  description = "Shoal state store: Valkey/Redis from the EKS nodes only"
  vpc_id      = var.vpc_id

  tags = { Name = "${var.name}-redis" }
}

resource "aws_vpc_security_group_ingress_rule" "from_nodes" {
  security_group_id            = aws_security_group.this.id
  description                  = "Redis protocol (TLS) from the EKS nodes and pods"
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6379
  referenced_security_group_id = var.client_security_group_id
}

# Letters and digits only: the token is embedded in a URL as is.
resource "random_password" "auth_token" {
  length  = 64
  special = false
}

resource "aws_cloudwatch_log_group" "this" {
  for_each = toset(["slow-log", "engine-log"])

  name              = "/aws/elasticache/${var.name}/${each.value}"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key_arn
}

resource "aws_elasticache_replication_group" "this" {
  replication_group_id = "${var.name}-state"
  description          = "Shoal shared state"
  engine               = "valkey"
  engine_version       = var.engine_version
  parameter_group_name = var.parameter_group_name
  node_type            = var.node_type
  port                 = 6379
  num_cache_clusters   = 1 + var.replicas

  automatic_failover_enabled = true
  multi_az_enabled           = true

  subnet_group_name  = aws_elasticache_subnet_group.this.name
  security_group_ids = [aws_security_group.this.id]

  at_rest_encryption_enabled = true
  kms_key_id                 = var.kms_key_arn
  transit_encryption_enabled = true
  transit_encryption_mode    = "required"
  auth_token                 = random_password.auth_token.result
  auth_token_update_strategy = "ROTATE"

  snapshot_retention_limit   = 7
  snapshot_window            = "03:00-04:00"
  maintenance_window         = "sun:05:00-sun:06:00"
  auto_minor_version_upgrade = true
  apply_immediately          = false

  log_delivery_configuration {
    destination      = aws_cloudwatch_log_group.this["slow-log"].name
    destination_type = "cloudwatch-logs"
    log_format       = "json"
    log_type         = "slow-log"
  }

  log_delivery_configuration {
    destination      = aws_cloudwatch_log_group.this["engine-log"].name
    destination_type = "cloudwatch-logs"
    log_format       = "json"
    log_type         = "engine-log"
  }
}

# What the pods read (through the External Secrets Operator): SHOAL_REDIS_URL.
resource "aws_secretsmanager_secret" "url" {
  #checkov:skip=CKV2_AWS_57:The AUTH token is rotated with ElastiCache's two-token ROTATE strategy (auth_token_update_strategy): taint random_password.auth_token and apply; a Lambda rotator cannot update the replication group and this secret together
  name                    = "${var.name}/redis"
  description             = "Shoal: Redis URL with AUTH token (SHOAL_REDIS_URL)"
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = var.secret_recovery_window_days
}

resource "aws_secretsmanager_secret_version" "url" {
  secret_id = aws_secretsmanager_secret.url.id
  secret_string = jsonencode({
    url        = "rediss://:${random_password.auth_token.result}@${aws_elasticache_replication_group.this.primary_endpoint_address}:6379/0"
    host       = aws_elasticache_replication_group.this.primary_endpoint_address
    port       = 6379
    auth_token = random_password.auth_token.result
  })
}
