output "name" {
  description = "The name of the group, its launch template, instance role and instance profile."
  value       = local.name
}

output "autoscaling_group_name" {
  description = "The Auto Scaling group (`deployer publish --wait --asg`)."
  value       = aws_autoscaling_group.fleet.name
}

output "launch_template_id" {
  description = "The launch template."
  value       = aws_launch_template.fleet.id
}

output "instance_role_arn" {
  description = "The instance role."
  value       = aws_iam_role.instance.arn
}

output "instance_role_id" {
  description = "The instance role's unique id: an instance's `aws:userid`, and so its status key and queue owner tag, is `<this>:<instance id>`."
  value       = aws_iam_role.instance.unique_id
}

output "instance_profile_arn" {
  description = "The instance profile the launch template uses."
  value       = aws_iam_instance_profile.instance.arn
}

output "instance_policy_json" {
  description = "The instance policy (`deployer iam-policy --for instance --stage --role [--asg] [--deregister]`)."
  value       = local.instance_policy
}

output "agent_config" {
  description = "The agent config an instance of this group runs with (user_data mode writes exactly this to /etc/deployer/agent.yml)."
  value       = local.agent_config
}

output "user_data" {
  description = "The cloud-init user-data of the launch template (before base64)."
  value       = local.user_data
}
