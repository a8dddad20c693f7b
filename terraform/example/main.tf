# An example root module: the shared deployer resources and one group of instances, with a CI
# role GitHub Actions assumes through OIDC. tests/provision/test_terraform.py applies it (against
# the emulator, with the switches in variables.tf that moto needs) and converges an agent on it.

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
  region = var.region
}

module "deployer" {
  source = "../modules/deployer"

  bucket_name      = var.bucket_name
  topic_name       = "deployer"
  bucket_lifecycle = var.bucket_lifecycle
  bucket_policy    = var.bucket_policy
  force_destroy    = var.force_destroy
  ci_stage         = var.stage

  # Deploy events: CI sends its own to event_bus, and on the default bus the module's rules
  # deliver them (and the instances' event objects) to the target, whose policy must admit
  # EventBridge (terraform/README.md, "Deploy events").
  event_bus         = var.event_bus
  events_target     = var.events_target_arn == null ? null : { arn = var.events_target_arn }
  notify_topic_arns = var.notify_topic_arns

  ci_role = var.github_repository == null ? null : {
    name = "deployer-ci"
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

  gc_role = var.gc_role ? {
    name = "deployer-gc"
    assume_role_policy = jsonencode({
      Version = "2012-10-17"
      Statement = [{
        Effect    = "Allow"
        Principal = { Service = "lambda.amazonaws.com" }
        Action    = "sts:AssumeRole"
      }]
    })
  } : null
}

module "web" {
  source = "../modules/fleet"

  stage      = var.stage
  role       = "web"
  components = ["provision", "api"]

  bucket_name  = module.deployer.bucket_name
  topic_arn    = module.deployer.topic_arn
  prefix       = module.deployer.prefix
  queue_prefix = module.deployer.queue_prefix

  image_id                  = var.image_id
  subnet_ids                = var.subnet_ids
  desired_capacity          = var.desired_capacity
  wait_for_capacity_timeout = var.wait_for_capacity_timeout
  deregister_on_shutdown    = var.deregister_on_shutdown
  terminate_hook            = var.terminate_hook
}
