variable "bucket_name" {
  description = "The release/status bucket (releases, channel pointers and history, status reports, trust updates)."
  type        = string
}

variable "topic_name" {
  description = "The deploy topic every agent's queue subscribes to."
  type        = string
  default     = "deployer"
}

variable "prefix" {
  description = "Key prefix in the bucket (the agents' and the CLI's `prefix`)."
  type        = string
  default     = "deployer"
}

variable "queue_prefix" {
  description = "The agents' `queue_prefix`: queues are `<queue_prefix>--<stage>--<role>--<instance id>`, and the topic policy admits only those."
  type        = string
  default     = "deployer"
  validation {
    condition     = can(regex("^[A-Za-z0-9]+([-_][A-Za-z0-9]+)*$", var.queue_prefix))
    error_message = "queue_prefix is words of letters and digits joined by single - or _ (never --, the queue-name separator)."
  }
}

variable "bucket_versioning" {
  description = "Turn on S3 versioning. Off by default: releases and history entries are written once (If-None-Match), pointers keep their own history/ objects, and versioning would mostly keep every rewrite of every status report (one per heartbeat per instance)."
  type        = bool
  default     = false
}

variable "abort_incomplete_multipart_days" {
  description = "Days after which an interrupted multipart upload (a CI job killed mid-publish) is aborted and its parts deleted."
  type        = number
  default     = 1
}

variable "bucket_lifecycle" {
  description = "Create the bucket's lifecycle configuration (abort incomplete multipart uploads). The emulator test turns it off: see terraform/README.md, \"What the emulator cannot apply\"."
  type        = bool
  default     = true
}

variable "bucket_policy" {
  description = "Attach the bucket policy (`deployer iam-policy --for bucket`) that makes conditional writes the rule. The emulator test turns it off: moto enforces a bucket policy's Deny statements without their conditions, which would deny every publish."
  type        = bool
  default     = true
}

variable "force_destroy" {
  description = "Let `terraform destroy` delete the bucket with every release, pointer and report in it. For throwaway stacks and tests only."
  type        = bool
  default     = false
}

variable "publisher_arns" {
  description = "IAM role or user ARNs allowed to publish deploys, besides the CI role this module creates. With none (and no CI role) the account's IAM decides who publishes."
  type        = list(string)
  default     = []
}

variable "ci_stage" {
  description = "Narrow the CI policy to one stage's channels (`iam-policy --for ci --stage`); null: every stage."
  type        = string
  default     = null
  validation {
    condition     = var.ci_stage == null || can(regex("^[a-z0-9]+([-_][a-z0-9]+)*$", var.ci_stage))
    error_message = "ci_stage is lowercase words of letters and digits joined by single - or _."
  }
}

variable "ci_sign_key_arns" {
  description = "KMS release-key ARNs the CI principal may sign deploys with (`iam-policy --for ci --sign-key kms:ARN`)."
  type        = list(string)
  default     = []
}

variable "metrics_namespace" {
  description = "The CloudWatch namespace `deployer status --metrics` puts the fleet's gauges into (its `--metrics-namespace`, env DEPLOYER_METRICS_NAMESPACE): the CI and gc policies grant cloudwatch:PutMetricData in it only."
  type        = string
  default     = "Deployer"
  validation {
    condition     = can(regex("^[0-9A-Za-z._#:/ -]{1,255}$", var.metrics_namespace)) && !startswith(var.metrics_namespace, "AWS/") && !startswith(var.metrics_namespace, ":") && trimspace(var.metrics_namespace) != ""
    error_message = "metrics_namespace is 1 to 255 of letters, digits, '.', '-', '_', '/', '#', ':' and spaces, not starting with ':' or 'AWS/' (a CloudWatch namespace)."
  }
}

variable "event_bus" {
  description = "The EventBridge bus CI sends deploy events to (`deployer publish|rollback|rollout … --event-bus`): its name (`default`, or a bus of the topic's account and region) or ARN. The CI policy then allows events:PutEvents on it with source `deployer` only (`iam-policy --event-bus`), and cli_environment sets DEPLOYER_EVENT_BUS. The rules of events_target are on the default bus, so they see the CLI's events only if this is `default`. null: no events permission."
  type        = string
  default     = null
  validation {
    condition     = var.event_bus == null || can(regex("^([A-Za-z0-9._-]{1,256}|arn:aws[a-z-]*:events:[a-z0-9-]+:[0-9]{12}:event-bus/[A-Za-z0-9._/-]{1,256})$", var.event_bus))
    error_message = "event_bus is an event bus name (letters, digits, '.', '_', '-') or an event bus ARN (arn:aws:events:REGION:ACCOUNT:event-bus/NAME)."
  }
}

variable "notify_topic_arns" {
  description = "SNS topics CI tells of holds, rollbacks, failures and successes (`--notify TOPIC_ARN`): the CI policy allows sns:Publish on them (`iam-policy --notify`), and cli_environment sets DEPLOYER_NOTIFY. Webhooks need no permission and are not listed here."
  type        = list(string)
  default     = []
  validation {
    condition     = alltrue([for arn in var.notify_topic_arns : can(regex("^arn:aws[a-z-]*:sns:[a-z0-9-]+:[0-9]{12}:[A-Za-z0-9_-]{1,256}$", arn))])
    error_message = "notify_topic_arns are SNS topic ARNs (arn:aws:sns:REGION:ACCOUNT:NAME)."
  }
}

variable "assume_role_arns" {
  description = "The CI roles of targets in other accounts that this account's CI assumes for `deployer publish --targets` (a fleet definition's `role`s): the CI policy allows sts:AssumeRole on them only (`iam-policy --for ci --assume-role`). Each role's trust policy must admit this account's CI principal (`iam-policy --for target-trust`; terraform/example-targets/ writes one)."
  type        = list(string)
  default     = []
  validation {
    condition     = alltrue([for arn in var.assume_role_arns : can(regex("^arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9_+=,.@/-]{1,512}$", arn))])
    error_message = "assume_role_arns are IAM role ARNs (arn:aws:iam::ACCOUNT:role/NAME)."
  }
}

variable "events_target" {
  description = "Route deploy events to this SQS queue, SNS topic or CloudWatch Logs log group (`arn`), as `deployer init --events-target` does: turns on the bucket's EventBridge notifications (this module then owns the bucket's whole notification configuration) and creates the rules deployer-fleet-events (source `deployer`) and deployer-instance-events (S3 Object Created under `<prefix>/events/` of this bucket) on the default bus, each with this target. The target's resource policy must let events.amazonaws.com deliver (an SQS queue policy allowing sqs:SendMessage, an SNS topic policy allowing sns:Publish, a CloudWatch Logs resource policy; conditioned on the rule ARNs this module outputs), and a KMS-encrypted queue or topic needs its key to allow it too: the module does not own the target and writes none of these (terraform/example/ writes a queue's). An object, not a string, so that whether it is set is known at plan even when the ARN is of a resource created in the same apply. null: no rules, no notification."
  type = object({
    arn = string
  })
  default = null
  validation {
    condition     = var.events_target == null || can(regex("^arn:aws[a-z-]*:(sqs|sns|logs):[a-z0-9-]+:[0-9]{12}:", var.events_target.arn))
    error_message = "events_target.arn is an SQS queue, SNS topic or CloudWatch Logs log group ARN."
  }
}

variable "ci_role" {
  description = "Create a CI role with the CI policy attached: its name and trust policy (e.g. GitHub's OIDC provider, see terraform/README.md). It is also made the topic's publisher. null: create none."
  type = object({
    name               = string
    assume_role_policy = string
  })
  default = null
}

variable "ci_attach_to_roles" {
  description = "Names of existing roles (a CI runner's) to attach the CI policy to. Add their ARNs to publisher_arns too if the topic should admit them."
  type        = list(string)
  default     = []
}

variable "gc_role" {
  description = "Create a role for `deployer gc` with the gc policy attached: its name and trust policy (e.g. lambda.amazonaws.com or scheduler.amazonaws.com). The module runs nothing on a schedule itself. null: create none."
  type = object({
    name               = string
    assume_role_policy = string
  })
  default = null
}

variable "tags" {
  description = "Tags for every resource this module creates."
  type        = map(string)
  default     = {}
}
