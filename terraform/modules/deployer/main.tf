# The shared half of fleet-deployer: the bucket, the topic and the CI (and optionally gc) role,
# and optionally the EventBridge rules `deployer init --events-target` puts.
# Every policy is rendered from terraform/policies/, which scripts/terraform-policies generates
# from `deployer iam-policy`: the module grants exactly what the CLI prints.

locals {
  policies = "${path.module}/../../policies"
  # Region and account come from the topic ARN, as `deployer iam-policy` takes them.
  topic_arn_parts = split(":", aws_sns_topic.deploys.arn)
  policy_vars = {
    partition         = local.topic_arn_parts[1]
    region            = local.topic_arn_parts[3]
    account           = local.topic_arn_parts[4]
    topic             = var.topic_name
    bucket            = var.bucket_name
    prefix            = var.prefix
    queue_prefix      = var.queue_prefix
    stage             = coalesce(var.ci_stage, "*")
    publisher_arns    = local.publisher_arns
    sign_key_arns     = var.ci_sign_key_arns
    metrics_namespace = var.metrics_namespace
    # `iam-policy --event-bus` takes a name (a bus of the topic's account and region) or an ARN.
    event_bus_arn = var.event_bus == null ? null : (
      startswith(var.event_bus, "arn:") ? var.event_bus
      : "arn:${local.topic_arn_parts[1]}:events:${local.topic_arn_parts[3]}:${local.topic_arn_parts[4]}:event-bus/${var.event_bus}"
    )
    # The command lists them sorted.
    notify_topic_arns = sort(var.notify_topic_arns)
    assume_role_arns  = sort(var.assume_role_arns)
  }
  publisher_arns = concat(aws_iam_role.ci[*].arn, var.publisher_arns)
  ci_variant     = "ci${var.ci_stage == null ? "" : "-stage"}${length(var.ci_sign_key_arns) > 0 ? "-sign" : ""}"
  # `deployer iam-policy --for ci [--stage] [--sign-key] [--event-bus] [--notify] [--assume-role]`:
  # --event-bus, --notify and --assume-role only add statements, so the policy is the union by Sid
  # of the base template and each option's (in the order the CLI writes them, first appearance
  # kept), as the fleet module does.
  ci_policy_variants = concat(
    [local.ci_variant],
    var.event_bus == null ? [] : ["ci-events"],
    length(var.notify_topic_arns) > 0 ? ["ci-notify"] : [],
    length(var.assume_role_arns) > 0 ? ["ci-assume"] : [],
  )
  ci_statements = flatten([
    for variant in local.ci_policy_variants :
    jsondecode(templatefile("${local.policies}/${variant}.json.tftpl", local.policy_vars)).Statement
  ])
  ci_sids = [for statement in local.ci_statements : statement.Sid]
  ci_policy = jsonencode({
    Version   = "2012-10-17"
    Statement = [for i, statement in local.ci_statements : statement if index(local.ci_sids, statement.Sid) == i]
  })
  gc_policy     = templatefile("${local.policies}/gc.json.tftpl", local.policy_vars)
  bucket_policy = templatefile("${local.policies}/bucket.json.tftpl", local.policy_vars)
  topic_policy = templatefile(
    "${local.policies}/${length(local.publisher_arns) > 0 ? "topic-publishers" : "topic"}.json.tftpl", local.policy_vars
  )
}

resource "aws_s3_bucket" "deploys" {
  bucket        = var.bucket_name
  force_destroy = var.force_destroy
  tags          = var.tags
}

resource "aws_s3_bucket_public_access_block" "deploys" {
  bucket                  = aws_s3_bucket.deploys.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "deploys" {
  bucket = aws_s3_bucket.deploys.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "deploys" {
  bucket = aws_s3_bucket.deploys.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_versioning" "deploys" {
  count  = var.bucket_versioning ? 1 : 0
  bucket = aws_s3_bucket.deploys.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "deploys" {
  count  = var.bucket_lifecycle ? 1 : 0
  bucket = aws_s3_bucket.deploys.id
  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = var.abort_incomplete_multipart_days
    }
  }
}

resource "aws_s3_bucket_policy" "deploys" {
  count  = var.bucket_policy ? 1 : 0
  bucket = aws_s3_bucket.deploys.id
  policy = local.bucket_policy
  # A bucket policy that denies is refused while public access blocks are being set.
  depends_on = [aws_s3_bucket_public_access_block.deploys]
}

resource "aws_sns_topic" "deploys" {
  name = var.topic_name
  tags = var.tags
}

resource "aws_sns_topic_policy" "deploys" {
  arn    = aws_sns_topic.deploys.arn
  policy = local.topic_policy
}

resource "aws_iam_policy" "ci" {
  name        = "${var.topic_name}-ci"
  description = "fleet-deployer CI: publish, publish --wait, status, history, rollback (deployer iam-policy --for ci)"
  policy      = local.ci_policy
  tags        = var.tags
}

resource "aws_iam_role" "ci" {
  count              = var.ci_role == null ? 0 : 1
  name               = var.ci_role.name
  assume_role_policy = var.ci_role.assume_role_policy
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "ci" {
  for_each   = toset(concat(aws_iam_role.ci[*].name, var.ci_attach_to_roles))
  role       = each.value
  policy_arn = aws_iam_policy.ci.arn
}

resource "aws_iam_role" "gc" {
  count              = var.gc_role == null ? 0 : 1
  name               = var.gc_role.name
  assume_role_policy = var.gc_role.assume_role_policy
  tags               = var.tags
}

resource "aws_iam_role_policy" "gc" {
  count  = var.gc_role == null ? 0 : 1
  name   = "deployer-gc"
  role   = aws_iam_role.gc[0].id
  policy = local.gc_policy
}

# Deploy events (`deployer init --events-target`, deployer/aws/events.py `route_events`): the
# bucket tells EventBridge of its objects, and two rules on the default bus, with the names and
# patterns `route_events` puts, deliver the CLI's events and the instances' event objects to one
# target. The target's own resource policy must let events.amazonaws.com deliver: the module
# does not own the target, so it writes no policy on it (variables.tf, events_target).
locals {
  events = var.events_target == null ? 0 : 1
  # deployer.protocol.layout.Layout.events_prefix: `<prefix>/events/`, the prefix's slashes trimmed.
  events_prefix = trim(var.prefix, "/") == "" ? "events/" : "${trim(var.prefix, "/")}/events/"
  # deployer.protocol.events.EVENT_SOURCE, FLEET_RULE, INSTANCE_RULE; the test compares the
  # patterns with deployer.aws.events.fleet_pattern() and instance_pattern().
  event_source       = "deployer"
  events_description = "fleet-deployer: deploy events to the operators' target"
}

# S3 has one notification configuration per bucket, and this resource owns all of it: a
# notification put on the bucket outside this module is removed by the next apply.
resource "aws_s3_bucket_notification" "deploys" {
  count       = local.events
  bucket      = aws_s3_bucket.deploys.id
  eventbridge = true
}

resource "aws_cloudwatch_event_rule" "fleet" {
  count          = local.events
  name           = "deployer-fleet-events"
  description    = local.events_description
  event_bus_name = "default"
  event_pattern  = jsonencode({ source = [local.event_source] })
  tags           = var.tags
}

resource "aws_cloudwatch_event_rule" "instance" {
  count          = local.events
  name           = "deployer-instance-events"
  description    = local.events_description
  event_bus_name = "default"
  event_pattern = jsonencode({
    source        = ["aws.s3"]
    "detail-type" = ["Object Created"]
    detail = {
      bucket = { name = [aws_s3_bucket.deploys.id] }
      object = { key = [{ prefix = local.events_prefix }] }
    }
  })
  tags = var.tags
}

resource "aws_cloudwatch_event_target" "fleet" {
  count          = local.events
  rule           = aws_cloudwatch_event_rule.fleet[0].name
  event_bus_name = "default"
  target_id      = "deployer"
  arn            = var.events_target.arn
}

resource "aws_cloudwatch_event_target" "instance" {
  count          = local.events
  rule           = aws_cloudwatch_event_rule.instance[0].name
  event_bus_name = "default"
  target_id      = "deployer"
  arn            = var.events_target.arn
}
