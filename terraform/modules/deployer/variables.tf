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
