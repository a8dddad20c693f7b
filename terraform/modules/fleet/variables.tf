variable "name" {
  description = "Name of the group's instance role, instance profile, launch template and Auto Scaling group. Default: deployer-<stage>-<role>."
  type        = string
  default     = null
}

variable "stage" {
  description = "The stage this group's instances follow (the agent's `stage`)."
  type        = string
  validation {
    condition     = can(regex("^[a-z0-9]+([-_][a-z0-9]+)*$", var.stage)) && length(var.stage) <= 32
    error_message = "stage is lowercase words of letters and digits joined by single - or _, at most 32 characters."
  }
}

variable "role" {
  description = "The role this group's instances follow (the agent's `role`)."
  type        = string
  validation {
    condition     = can(regex("^[a-z0-9]+([-_][a-z0-9]+)*$", var.role)) && length(var.role) <= 32
    error_message = "role is lowercase words of letters and digits joined by single - or _, at most 32 characters."
  }
}

variable "components" {
  description = "The components the instances install, in boot order (e.g. [\"provision\", \"api\"])."
  type        = list(string)
  validation {
    condition     = length(var.components) > 0 && alltrue([for c in var.components : can(regex("^[a-z0-9]+([-_][a-z0-9]+)*$", c))])
    error_message = "components is a non-empty list of lowercase words joined by single - or _."
  }
}

variable "bucket_name" {
  description = "The release/status bucket (the deployer module's bucket_name output)."
  type        = string
}

variable "topic_arn" {
  description = "The deploy topic (the deployer module's topic_arn output); region and account of the policies come from it."
  type        = string
}

variable "prefix" {
  description = "Key prefix in the bucket (the deployer module's prefix output)."
  type        = string
  default     = "deployer"
}

variable "queue_prefix" {
  description = "The agents' `queue_prefix` (the deployer module's queue_prefix output)."
  type        = string
  default     = "deployer"
}

variable "image_id" {
  description = "The base AMI packer/ builds (the agent installed, its units enabled)."
  type        = string
}

variable "instance_type" {
  description = "The instances' type."
  type        = string
  default     = "t3.small"
}

variable "subnet_ids" {
  description = "Subnets the Auto Scaling group launches into."
  type        = list(string)
}

variable "security_group_ids" {
  description = "Security groups of the instances (the agent itself needs only outbound HTTPS to S3, SNS, SQS, STS and Auto Scaling)."
  type        = list(string)
  default     = []
}

variable "min_size" {
  description = "The group's minimum size."
  type        = number
  default     = 1
}

variable "max_size" {
  description = "The group's maximum size."
  type        = number
  default     = 2
}

variable "desired_capacity" {
  description = "The group's desired capacity; null: Auto Scaling's own (the minimum)."
  type        = number
  default     = null
}

variable "wait_for_capacity_timeout" {
  description = "How long `terraform apply` waits for the group's instances to be InService (with the launch hook: converged on the current releases); \"0\" does not wait."
  type        = string
  default     = "10m"
}

variable "agent_config_from" {
  description = "Where an instance's /etc/deployer/agent.yml comes from: \"user_data\" (scripts/cloud-init/user-data.yml, written with this module's values) or \"tags\" (scripts/cloud-init/user-data-tags.yml: deployer:* instance tags read over IMDSv2; supports neither the launch hook, deregister_on_shutdown, a queue_prefix other than deployer, nor agent_config)."
  type        = string
  default     = "user_data"
  validation {
    condition     = contains(["user_data", "tags"], var.agent_config_from)
    error_message = "agent_config_from is \"user_data\" or \"tags\"."
  }
}

variable "agent_config" {
  description = "More agent config keys for user_data mode (e.g. { trust_file = \"/etc/deployer/trust.json\", require_signatures = true }); see the README's configuration reference."
  type        = map(any)
  default     = {}
}

variable "launch_hook" {
  description = "Add the launch lifecycle hook the agent completes after boot replay, so an instance enters service only on the current releases (user_data mode only)."
  type        = bool
  default     = true
}

variable "launch_hook_name" {
  description = "The launch hook's name (the agent's `lifecycle_hook_name`)."
  type        = string
  default     = "deployer-boot"
}

variable "launch_hook_timeout_seconds" {
  description = "The hook's heartbeat timeout: longer than boot replay takes. At its end the default result, ABANDON, applies."
  type        = number
  default     = 900
}

variable "terminate_hook" {
  description = "Add the terminate lifecycle hook the agent completes after leaving cleanly (apply finished, out of its target groups, queues removed, `terminated` reported); user_data mode only."
  type        = bool
  default     = false
}

variable "terminate_hook_name" {
  description = "The terminate hook's name (the agent's `terminate_hook_name`)."
  type        = string
  default     = "deployer-leave"
}

variable "terminate_hook_timeout_seconds" {
  description = "The terminate hook's heartbeat timeout (30..7200); the agent heartbeats it while an apply runs, up to 100 times this (48 h at most)."
  type        = number
  default     = 600
  validation {
    condition     = var.terminate_hook_timeout_seconds >= 30 && var.terminate_hook_timeout_seconds <= 7200
    error_message = "terminate_hook_timeout_seconds must be 30..7200 (Auto Scaling's HeartbeatTimeout bounds)."
  }
}

variable "scale_in_protection" {
  description = "Agents protect their instance from scale-in while a deploy runs (never left on after a crash); user_data mode only."
  type        = bool
  default     = false
}

variable "secret_arns" {
  description = "SSM parameter and Secrets Manager secret ARNs the fleet's manifests name in their env (`*` allowed): the instance policy may read exactly these (deployer iam-policy --secrets)."
  type        = list(string)
  default     = []
  validation {
    condition     = alltrue([for arn in var.secret_arns : length(regexall("^arn:aws[a-z-]*:(ssm|secretsmanager):", arn)) > 0])
    error_message = "secret_arns must be SSM parameter or Secrets Manager secret ARNs."
  }
}

variable "target_group_arns" {
  description = "ELBv2 target groups the group's instances serve in: the group registers them, the agent leaves and rejoins them around each release switch (user_data mode only)."
  type        = list(string)
  default     = []
}

variable "deregister_on_shutdown" {
  description = "Agents remove their own queues, subscription and status report on a clean SIGTERM (scale-in). Grants an unscoped sns:Unsubscribe; the alternative is `deployer gc` on a schedule."
  type        = bool
  default     = false
}

variable "instance_policy_arns" {
  description = "More managed policies for the instance role (e.g. AmazonSSMManagedInstanceCore)."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Tags for every resource this module creates (and, through the group, its instances)."
  type        = map(string)
  default     = {}
}
