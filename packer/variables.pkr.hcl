variable "region" {
  type        = string
  default     = "eu-west-1"
  description = "Region the AMI is built in (copy it elsewhere with ami_regions)."
}

variable "ami_regions" {
  type        = list(string)
  default     = []
  description = "Extra regions to copy the finished AMI to."
}

variable "distro" {
  type        = string
  default     = "al2023"
  description = "Base image: al2023 (Amazon Linux 2023) or ubuntu-24.04."
  validation {
    condition     = contains(["al2023", "ubuntu-24.04"], var.distro)
    error_message = "The distro must be al2023 or ubuntu-24.04 (add others to base_ami_filters and provision.sh)."
  }
}

variable "base_ami_filters" {
  type = map(object({
    name         = string
    owner        = string
    ssh_username = string
  }))
  description = "Per distro: the newest AMI whose name matches `name`, published by `owner`."
  default = {
    "al2023" = {
      name         = "al2023-ami-2023.*-kernel-*-x86_64"
      owner        = "137112412989" # Amazon
      ssh_username = "ec2-user"
    }
    "ubuntu-24.04" = {
      name         = "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"
      owner        = "099720109477" # Canonical
      ssh_username = "ubuntu"
    }
  }
}

variable "instance_type" {
  type    = string
  default = "t3.small"
}

variable "agent" {
  type        = string
  description = "The agent to install: a path to a fleet_deployer wheel (python -m pip wheel --no-deps -w dist .), or a version of fleet-deployer to take from the package index."
  validation {
    # Packer 1.6 (CI) offers no regex functions in validation rules; base.pkr.hcl tells a
    # wheel from a version by the .whl suffix.
    condition     = length(var.agent) > 0
    error_message = "The agent must be set: a path to a .whl, or a version number such as 0.1.0."
  }
}

variable "ami_name_prefix" {
  type    = string
  default = "fleet-deployer-base"
}

variable "tags" {
  type        = map(string)
  default     = {}
  description = "Extra tags for the AMI and its snapshots."
}

variable "trust_file" {
  type        = string
  default     = ""
  description = "A trust document (`deployer trust new`) to bake in as /etc/deployer/trust.json: the keys whose signatures the fleet believes. Empty: no trust file."
}

variable "seed" {
  type        = list(string)
  default     = []
  description = "Releases to bake in, each \"stage/role/component\" (the channel's current release) or \"stage/role/component=RELEASE_ID\": `deployer seed` puts their verified files under releases/ and nothing else (no queue, subscription, report or state), so an instance converges without downloading them while a deploy still names them. Symlink-strategy releases only; the builder's instance profile needs the instance policy's S3 reads."
}

variable "seed_bucket" {
  type        = string
  default     = ""
  description = "The release bucket `seed` reads from (required with seed)."
}

variable "seed_prefix" {
  type    = string
  default = "deployer"
}
