output "fleet_yml" {
  description = "The fleet definition (`terraform output -raw fleet_yml > fleet.yml`, then `deployer publish --targets fleet.yml`): target A, reached with the source CI role's own credentials, then target B, through its CI role and the external id."
  value = yamlencode({
    targets = [
      {
        name   = var.target_a.name
        region = var.target_a.region
        bucket = module.target_a.bucket_name
        topic  = module.target_a.topic_arn
        prefix = module.target_a.prefix
      },
      {
        name        = var.target_b.name
        region      = var.target_b.region
        bucket      = module.target_b.bucket_name
        topic       = module.target_b.topic_arn
        prefix      = module.target_b.prefix
        role        = module.target_b.ci_role_arn
        external_id = var.external_id
      },
    ]
  })
}

output "source_ci_role_arn" {
  description = "The role the GitHub Actions workflow assumes and runs `deployer publish --targets` as."
  value       = module.target_a.ci_role_arn
}

output "target_ci_role_arn" {
  description = "Target B's CI role, which the source CI role assumes (the fleet definition's `role`)."
  value       = module.target_b.ci_role_arn
}

output "source_ci_policy_json" {
  description = "The source CI role's policy: `iam-policy --for ci --stage STAGE --assume-role TARGET_CI_ROLE` for target A."
  value       = module.target_a.ci_policy_json
}

output "target_ci_policy_json" {
  description = "Target B's CI role's policy: `iam-policy --for ci --stage STAGE` for target B."
  value       = module.target_b.ci_policy_json
}

output "target_trust_policy_json" {
  description = "Target B's CI role's trust policy: `iam-policy --for target-trust --publisher-arn SOURCE_CI_ROLE --external-id EXTERNAL_ID`."
  value       = local.target_trust
}

output "target_a" {
  description = "Target A's bucket, topic, prefix and queue prefix: what the fleet module's groups in region A take."
  value = {
    bucket_name  = module.target_a.bucket_name
    topic_arn    = module.target_a.topic_arn
    prefix       = module.target_a.prefix
    queue_prefix = module.target_a.queue_prefix
  }
}

output "target_b" {
  description = "Target B's bucket, topic, prefix and queue prefix: what the fleet module's groups in region B (provider aws.b) take."
  value = {
    bucket_name  = module.target_b.bucket_name
    topic_arn    = module.target_b.topic_arn
    prefix       = module.target_b.prefix
    queue_prefix = module.target_b.queue_prefix
  }
}
