# One Auto Scaling group of fleet-deployer instances (one stage and role): its instance role and
# profile with `deployer iam-policy --for instance`, a launch template carrying the cloud-init
# user-data from scripts/cloud-init/ (IMDSv2 required), and the group with its launch and
# terminate hooks and its load balancer target groups.

locals {
  name     = coalesce(var.name, "deployer-${var.stage}-${var.role}")
  policies = "${path.module}/../../policies"
  cloud    = "${path.module}/../../../scripts/cloud-init"
  topic    = split(":", var.topic_arn)
  tags     = var.agent_config_from == "tags"
  hook     = var.launch_hook

  # `deployer iam-policy --for instance` with this group's options: each option only adds
  # statements, so the policy is the union by Sid of the base template and each option's (in the
  # order the CLI writes them, first appearance kept).
  policy_variants = concat(
    ["instance"],
    var.deregister_on_shutdown ? ["instance-deregister"] : [],
    length(var.target_group_arns) > 0 ? ["instance-traffic"] : [],
    local.hook ? ["instance-hook"] : [],
    var.terminate_hook ? ["instance-terminate"] : [],
    var.scale_in_protection ? ["instance-protect"] : [],
    length(local.parameter_arns) > 0 ? ["instance-parameters"] : [],
    length(local.secret_arns) > 0 ? ["instance-secrets"] : [],
  )
  # var.secret_arns split by service: each template grants its own read.
  parameter_arns = [for arn in var.secret_arns : arn if length(regexall(":ssm:", arn)) > 0]
  secret_arns    = [for arn in var.secret_arns : arn if length(regexall(":secretsmanager:", arn)) > 0]
  policy_statements = flatten([
    for variant in local.policy_variants : jsondecode(templatefile("${local.policies}/${variant}.json.tftpl", {
      partition         = local.topic[1]
      region            = local.topic[3]
      account           = local.topic[4]
      topic             = local.topic[5]
      bucket            = var.bucket_name
      prefix            = var.prefix
      queue_prefix      = var.queue_prefix
      stage             = var.stage
      role              = var.role
      asg_name          = local.name
      target_group_arns = var.target_group_arns
      parameter_arns    = local.parameter_arns
      secret_arns       = local.secret_arns
    })).Statement
  ])
  policy_sids = [for statement in local.policy_statements : statement.Sid]
  instance_policy = jsonencode({
    Version   = "2012-10-17"
    Statement = [for i, statement in local.policy_statements : statement if index(local.policy_sids, statement.Sid) == i]
  })

  # What /etc/deployer/agent.yml says in user_data mode (and what the tags say in tags mode).
  agent_config = merge(
    {
      stage        = var.stage
      role         = var.role
      components   = var.components
      bucket       = var.bucket_name
      topic_arn    = var.topic_arn
      region       = local.topic[3]
      prefix       = var.prefix
      queue_prefix = var.queue_prefix
    },
    # The group's name is given, so the instance policy needs no DescribeAutoScalingInstances.
    local.hook ? { lifecycle_hook_name = var.launch_hook_name } : {},
    local.hook || var.terminate_hook || var.scale_in_protection ? { lifecycle_asg_name = local.name } : {},
    var.scale_in_protection ? { scale_in_protection = true } : {},
    var.terminate_hook ? { terminate_hook_name = var.terminate_hook_name } : {},
    length(var.target_group_arns) > 0 ? { target_group_arns = var.target_group_arns } : {},
    var.deregister_on_shutdown ? { deregister_on_shutdown = true } : {},
    var.agent_config,
  )
  # scripts/cloud-init/user-data.yml with its agent.yml replaced by this group's config: the
  # file's path, owner and mode stay the repository's.
  cloud_config = yamldecode(file("${local.cloud}/user-data.yml"))
  user_data = local.tags ? file("${local.cloud}/user-data-tags.yml") : "#cloud-config\n${yamlencode(merge(local.cloud_config, {
    write_files = [
      for f in local.cloud_config.write_files :
      f.path == "/etc/deployer/agent.yml" ? merge(f, { content = yamlencode(local.agent_config) }) : f
    ]
  }))}"
  # The instance tags scripts/deployer-config-from-tags reads (tags mode only).
  config_tags = local.tags ? merge(
    {
      "deployer:stage"      = var.stage
      "deployer:role"       = var.role
      "deployer:components" = join(" ", var.components)
      "deployer:bucket"     = var.bucket_name
      "deployer:topic-arn"  = var.topic_arn
    },
    var.prefix == "deployer" ? {} : { "deployer:prefix" = var.prefix },
  ) : {}
}

resource "aws_iam_role" "instance" {
  name = local.name
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "ec2.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
  tags = var.tags
}

resource "aws_iam_role_policy" "agent" {
  name   = "deployer-agent"
  role   = aws_iam_role.instance.id
  policy = local.instance_policy
}

resource "aws_iam_role_policy_attachment" "extra" {
  for_each   = toset(var.instance_policy_arns)
  role       = aws_iam_role.instance.name
  policy_arn = each.value
}

resource "aws_iam_instance_profile" "instance" {
  name = local.name
  role = aws_iam_role.instance.name
  tags = var.tags
}

resource "aws_launch_template" "fleet" {
  name                   = local.name
  image_id               = var.image_id
  instance_type          = var.instance_type
  vpc_security_group_ids = length(var.security_group_ids) > 0 ? var.security_group_ids : null
  user_data              = base64encode(local.user_data)
  update_default_version = true

  iam_instance_profile {
    arn = aws_iam_instance_profile.instance.arn
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required" # IMDSv2 only; the agent and deployer-config-from-tags speak it
    http_put_response_hop_limit = 1
    instance_metadata_tags      = local.tags ? "enabled" : "disabled"
  }

  tags = var.tags

  lifecycle {
    precondition {
      condition     = !local.tags || (!var.launch_hook && !var.terminate_hook && !var.scale_in_protection && length(var.target_group_arns) == 0 && !var.deregister_on_shutdown && var.queue_prefix == "deployer" && length(var.agent_config) == 0)
      error_message = "agent_config_from = \"tags\" carries only stage, role, components, bucket, topic ARN and prefix: set launch_hook = false (an instance no agent completes the hook for would be abandoned), no terminate_hook, target_group_arns, deregister_on_shutdown, queue_prefix or agent_config, or use \"user_data\"."
    }
  }
}

resource "aws_autoscaling_group" "fleet" {
  name                      = local.name
  min_size                  = var.min_size
  max_size                  = var.max_size
  desired_capacity          = var.desired_capacity
  vpc_zone_identifier       = var.subnet_ids
  wait_for_capacity_timeout = var.wait_for_capacity_timeout

  launch_template {
    id      = aws_launch_template.fleet.id
    version = aws_launch_template.fleet.latest_version
  }

  # Auto Scaling registers an instance in these when it enters service (after the launch hook);
  # the agent leaves and rejoins them around each release switch.
  target_group_arns = var.target_group_arns

  # Hooks created with the group, not after it: the group's first instances wait for them too.
  # Launch: the agent completes it after boot replay (ABANDON if never). Terminate: scale-in
  # waits for the agent to finish its apply, leave its target groups and queues, and complete
  # it (heartbeating it while an apply runs; CONTINUE if never).
  dynamic "initial_lifecycle_hook" {
    for_each = concat(
      local.hook ? [{ name = var.launch_hook_name, transition = "LAUNCHING", timeout = var.launch_hook_timeout_seconds, default = "ABANDON" }] : [],
      var.terminate_hook ? [{ name = var.terminate_hook_name, transition = "TERMINATING", timeout = var.terminate_hook_timeout_seconds, default = "CONTINUE" }] : [],
    )
    content {
      name                 = initial_lifecycle_hook.value.name
      lifecycle_transition = "autoscaling:EC2_INSTANCE_${initial_lifecycle_hook.value.transition}"
      heartbeat_timeout    = initial_lifecycle_hook.value.timeout
      default_result       = initial_lifecycle_hook.value.default
    }
  }

  dynamic "tag" {
    for_each = merge(var.tags, local.config_tags)
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }
}
