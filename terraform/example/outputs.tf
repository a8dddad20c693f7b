output "bucket_name" {
  description = "The release/status bucket."
  value       = module.deployer.bucket_name
}

output "topic_arn" {
  description = "The deploy topic."
  value       = module.deployer.topic_arn
}

output "prefix" {
  description = "The key prefix in the bucket."
  value       = module.deployer.prefix
}

output "cli_environment" {
  description = "What CI exports before `deployer publish`."
  value       = module.deployer.cli_environment
}

output "ci_role_arn" {
  description = "The role the GitHub Actions workflow assumes (null without github_repository)."
  value       = module.deployer.ci_role_arn
}

output "gc_role_arn" {
  description = "The role a scheduled `deployer gc` runs as (null unless gc_role)."
  value       = module.deployer.gc_role_arn
}

output "web_autoscaling_group_name" {
  description = "The example group (`deployer publish --wait --asg`)."
  value       = module.web.autoscaling_group_name
}

output "web_instance_role_id" {
  description = "The instance role's unique id (an instance's aws:userid is `<this>:<instance id>`)."
  value       = module.web.instance_role_id
}

output "web_agent_config" {
  description = "The agent config the example group's instances run with."
  value       = module.web.agent_config
}

output "web_launch_template_id" {
  description = "The example group's launch template."
  value       = module.web.launch_template_id
}

output "web_instance_role_arn" {
  description = "The example group's instance role."
  value       = module.web.instance_role_arn
}

output "bucket_policy_json" {
  description = "The bucket policy (attached unless bucket_policy is false)."
  value       = module.deployer.bucket_policy_json
}

output "fleet_events_rule_arn" {
  description = "The rule that routes the CLI's deploy events (null without events_target_arn)."
  value       = module.deployer.fleet_events_rule_arn
}

output "instance_events_rule_arn" {
  description = "The rule that routes the instances' event objects (null without events_target_arn)."
  value       = module.deployer.instance_events_rule_arn
}
