output "bucket_name" {
  description = "The release/status bucket: DEPLOYER_BUCKET for the CLI, `bucket` in the agent config."
  value       = aws_s3_bucket.deploys.id
}

output "bucket_arn" {
  description = "The bucket's ARN."
  value       = aws_s3_bucket.deploys.arn
}

output "topic_arn" {
  description = "The deploy topic: DEPLOYER_TOPIC_ARN for the CLI, `topic_arn` in the agent config."
  value       = aws_sns_topic.deploys.arn
}

output "prefix" {
  description = "The key prefix in the bucket (DEPLOYER_PREFIX, the agents' `prefix`)."
  value       = var.prefix
}

output "queue_prefix" {
  description = "The agents' `queue_prefix` the topic policy admits."
  value       = var.queue_prefix
}

output "ci_policy_json" {
  description = "The CI policy document (`deployer iam-policy --for ci`), for a principal this module does not manage."
  value       = local.ci_policy
}

output "ci_policy_arn" {
  description = "The managed CI policy, attached to the CI role and to ci_attach_to_roles."
  value       = aws_iam_policy.ci.arn
}

output "ci_role_arn" {
  description = "The CI role's ARN (null unless ci_role is set)."
  value       = one(aws_iam_role.ci[*].arn)
}

output "bucket_policy_json" {
  description = "The bucket policy (`deployer iam-policy --for bucket`), attached unless bucket_policy is false."
  value       = local.bucket_policy
}

output "topic_policy_json" {
  description = "The topic policy (`deployer iam-policy --for topic [--publisher-arn …]`): the CI role and publisher_arns publish."
  value       = local.topic_policy
}

output "gc_policy_json" {
  description = "The `deployer gc` policy document (`deployer iam-policy --for gc`), whether or not gc_role is set."
  value       = local.gc_policy
}

output "gc_role_arn" {
  description = "The gc role's ARN (null unless gc_role is set)."
  value       = one(aws_iam_role.gc[*].arn)
}

output "fleet_events_rule_arn" {
  description = "The rule deployer-fleet-events on the default bus (the CLI's deploy events to events_target); null unless events_target is set."
  value       = one(aws_cloudwatch_event_rule.fleet[*].arn)
}

output "instance_events_rule_arn" {
  description = "The rule deployer-instance-events on the default bus (the objects agents write under `<prefix>/events/` to events_target); null unless events_target is set."
  value       = one(aws_cloudwatch_event_rule.instance[*].arn)
}

output "cli_environment" {
  description = "The environment `deployer publish|status|history|rollback|gc` read; with event_bus and notify_topic_arns, DEPLOYER_EVENT_BUS and DEPLOYER_NOTIFY (space-separated) too."
  value = merge(
    {
      DEPLOYER_BUCKET    = aws_s3_bucket.deploys.id
      DEPLOYER_TOPIC_ARN = aws_sns_topic.deploys.arn
      DEPLOYER_PREFIX    = var.prefix
    },
    var.event_bus == null ? {} : { DEPLOYER_EVENT_BUS = var.event_bus },
    length(var.notify_topic_arns) == 0 ? {} : { DEPLOYER_NOTIFY = join(" ", var.notify_topic_arns) },
  )
}
