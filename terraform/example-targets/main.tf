# A root module for `deployer publish --targets`: the deployer module once per target, target A in
# the account and region of the source CI role, target B in another region (and, with
# target_b.terraform_role_arn, another account), and the roles that let one CI job publish to both:
# the source CI role (GitHub Actions through OIDC) may assume target B's CI role, and target B's CI
# role trusts only it, with the external id. The fleet_yml output is the fleet definition.
# tests/provision/test_terraform.py applies it against the emulator and publishes with that output.

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0"
    }
  }
}

provider "aws" {
  alias  = "a"
  region = var.target_a.region
}

provider "aws" {
  alias  = "b"
  region = var.target_b.region
  # Target B in another account: Terraform manages it as a role there (not the CI role below).
  dynamic "assume_role" {
    for_each = var.target_b.terraform_role_arn == null ? [] : [var.target_b.terraform_role_arn]
    content {
      role_arn = assume_role.value
    }
  }
}

locals {
  # The policies scripts/terraform-policies generates from `deployer iam-policy`.
  policies = "${path.module}/../policies"
  # `deployer iam-policy --for target-trust --publisher-arn SOURCE_CI_ROLE --external-id ID`.
  target_trust = templatefile("${local.policies}/target-trust.json.tftpl", {
    publisher_arns = [module.target_a.ci_role_arn]
    external_id    = var.external_id
  })
  # IAM names are per account: with both targets in one account, the topic names (which name each
  # module's CI policy) and the two CI roles must differ.
  source_ci_role_name = "deployer-ci"
  target_ci_role_name = "deployer-ci-${var.target_b.name}"
}

module "target_a" {
  source    = "../modules/deployer"
  providers = { aws = aws.a }

  bucket_name      = var.target_a.bucket_name
  topic_name       = "deployer-${var.target_a.name}"
  bucket_lifecycle = var.bucket_lifecycle
  bucket_policy    = var.bucket_policy
  force_destroy    = var.force_destroy
  ci_stage         = var.stage

  # The source CI role: it publishes to target A with its own credentials, writes the record of
  # each publish across targets in this bucket, and may assume target B's CI role.
  ci_role = {
    name = local.source_ci_role_name
    assume_role_policy = jsonencode({
      Version = "2012-10-17"
      Statement = [{
        Effect    = "Allow"
        Principal = { Federated = var.github_oidc_provider_arn }
        Action    = "sts:AssumeRoleWithWebIdentity"
        Condition = {
          StringEquals = { "token.actions.githubusercontent.com:aud" = "sts.amazonaws.com" }
          StringLike   = { "token.actions.githubusercontent.com:sub" = "repo:${var.github_repository}:*" }
        }
      }]
    })
  }
  assume_role_arns = [module.target_b.ci_role_arn]
}

module "target_b" {
  source    = "../modules/deployer"
  providers = { aws = aws.b }

  bucket_name      = var.target_b.bucket_name
  topic_name       = "deployer-${var.target_b.name}"
  bucket_lifecycle = var.bucket_lifecycle
  bucket_policy    = var.bucket_policy
  force_destroy    = var.force_destroy
  ci_stage         = var.stage

  # Target B's CI role: this account's `iam-policy --for ci`, assumed by the source CI role only.
  # It is also the publisher the topic policy admits.
  ci_role = {
    name               = local.target_ci_role_name
    assume_role_policy = local.target_trust
  }
}
