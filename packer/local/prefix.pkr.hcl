# The base AMI's provisioning step, run by Packer on this machine into a throwaway root
# instead of on an EC2 builder: what CI uses to exercise the path without AWS.
# Needs only Packer's built-in `null` source and `shell-local` provisioner (no plugins).
#
#   packer build -var root=/tmp/root -var agent=dist/fleet_deployer-0.1.0-py3-none-any.whl packer/local/

variable "root" {
  type        = string
  description = "The throwaway root to provision into (an existing directory)."
}

variable "agent" {
  type        = string
  description = "Path to the fleet_deployer wheel (or a directory holding it)."
}

variable "python" {
  type        = string
  default     = "python3"
  description = "Python >= 3.11 used to create the agent's venv."
}

source "null" "prefix" {
  communicator = "none"
}

build {
  sources = ["source.null.prefix"]

  provisioner "shell-local" {
    inline = [
      "bash '${path.root}/../../scripts/provision.sh' --root '${var.root}' --wheel '${var.agent}' --python '${var.python}'",
    ]
  }
}
