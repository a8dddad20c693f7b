variable "target_a" {
  description = "The first target, in the account of the credentials Terraform runs with (the source CI role's account): its name in the fleet definition, its region and its bucket (globally unique)."
  type = object({
    name        = string
    region      = string
    bucket_name = string
  })
  validation {
    condition     = can(regex("^[a-z0-9]+([-_][a-z0-9]+)*$", var.target_a.name))
    error_message = "target_a.name is lowercase words of letters and digits joined by single - or _ (a fleet definition's target name)."
  }
}

variable "target_b" {
  description = "The second target: its name, region and bucket, and terraform_role_arn, a role in another account that Terraform assumes to create target B there (provider aws.b's assume_role; not the CI role). terraform_role_arn null: target B is in target A's account."
  type = object({
    name               = string
    region             = string
    bucket_name        = string
    terraform_role_arn = optional(string)
  })
  validation {
    condition     = can(regex("^[a-z0-9]+([-_][a-z0-9]+)*$", var.target_b.name)) && var.target_b.name != var.target_a.name
    error_message = "target_b.name is lowercase words of letters and digits joined by single - or _, and differs from target_a.name."
  }
}

variable "external_id" {
  description = "The external id target B's CI role requires (`iam-policy --for target-trust --external-id`, the fleet definition's external_id): the confused-deputy guard, the same for every target of one fleet."
  type        = string
  validation {
    # RE2 repeats at most 1000 times: the length is checked on its own.
    condition     = can(regex("^[A-Za-z0-9_+=,.@:/-]+$", var.external_id)) && length(var.external_id) >= 2 && length(var.external_id) <= 1224
    error_message = "external_id is 2 to 1224 characters of letters, digits and _+=,.@:/- (STS AssumeRole's ExternalId)."
  }
}

variable "stage" {
  description = "The stage whose channels both CI roles may move (`iam-policy --for ci --stage`)."
  type        = string
  default     = "prod"
}

variable "github_repository" {
  description = "owner/name of the repository whose GitHub Actions runs may assume the source CI role."
  type        = string
}

variable "github_oidc_provider_arn" {
  description = "The IAM OIDC provider for token.actions.githubusercontent.com in target A's account (create it once per account)."
  type        = string
}

# Switches for the emulator (tests/provision/test_terraform.py); leave them at their defaults on AWS.

variable "bucket_lifecycle" {
  description = "Create the buckets' lifecycle rules (moto cannot: see terraform/README.md)."
  type        = bool
  default     = true
}

variable "bucket_policy" {
  description = "Attach the conditional-writes bucket policies (moto enforces them without their conditions: see terraform/README.md)."
  type        = bool
  default     = true
}

variable "force_destroy" {
  description = "Let `terraform destroy` delete buckets that still hold releases (throwaway stacks and tests)."
  type        = bool
  default     = false
}
