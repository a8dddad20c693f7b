variable "region" {
  description = "The AWS region of every resource."
  type        = string
  default     = "eu-west-1"
}

variable "bucket_name" {
  description = "The release/status bucket's name (globally unique)."
  type        = string
}

variable "stage" {
  description = "The stage of the example group; the CI role may move only this stage's channels."
  type        = string
  default     = "prod"
}

variable "image_id" {
  description = "The base AMI built with packer/."
  type        = string
}

variable "subnet_ids" {
  description = "Subnets for the Auto Scaling group."
  type        = list(string)
}

variable "desired_capacity" {
  description = "Instances in the example group."
  type        = number
  default     = 1
}

variable "github_repository" {
  description = "owner/name of the repository whose GitHub Actions runs may assume the CI role; null: no CI role."
  type        = string
  default     = null
}

variable "github_oidc_provider_arn" {
  description = "The account's IAM OIDC provider for token.actions.githubusercontent.com (create it once per account)."
  type        = string
  default     = null
}

variable "gc_role" {
  description = "Create a role a scheduled Lambda running `deployer gc` can assume (the function itself is not part of this example)."
  type        = bool
  default     = false
}

variable "terminate_hook" {
  description = "Scale-in waits for each agent to leave cleanly (the fleet module's terminate hook)."
  type        = bool
  default     = true
}

variable "deregister_on_shutdown" {
  description = "Agents remove their own queues, subscription and report on a clean SIGTERM."
  type        = bool
  default     = false
}

variable "event_bus" {
  description = "The bus CI sends deploy events to (`default` for the rules of events_target_arn to see them); null: none."
  type        = string
  default     = null
}

variable "events_target_arn" {
  description = "An SQS queue, SNS topic or log group the deploy events are routed to; its policy must let events.amazonaws.com deliver. null: no rules."
  type        = string
  default     = null
}

variable "notify_topic_arns" {
  description = "SNS topics (a chat integration's) the CI role may tell of holds, rollbacks, failures and successes."
  type        = list(string)
  default     = []
}

# Switches for the emulator (tests/provision/test_terraform.py); leave them at their defaults on AWS.

variable "bucket_lifecycle" {
  description = "Create the bucket's lifecycle rule (moto cannot: see terraform/README.md)."
  type        = bool
  default     = true
}

variable "bucket_policy" {
  description = "Attach the conditional-writes bucket policy (moto enforces it without its conditions: see terraform/README.md)."
  type        = bool
  default     = true
}

variable "force_destroy" {
  description = "Let `terraform destroy` delete a bucket that still holds releases (throwaway stacks and tests)."
  type        = bool
  default     = false
}

variable "wait_for_capacity_timeout" {
  description = "How long apply waits for the group's instances to be InService."
  type        = string
  default     = "10m"
}
