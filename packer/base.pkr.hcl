# The fleet-deployer base AMI: the distro + Python + the agent in its venv + systemd units.
# No application inside: an instance converges by boot replay from the channel pointers.
#
#   packer init packer/ && packer build -var agent=dist/fleet_deployer-0.1.0-py3-none-any.whl packer/

locals {
  base       = var.base_ami_filters[var.distro]
  build_time = formatdate("YYYYMMDDhhmmss", timestamp())
  is_wheel   = try(substr(var.agent, -4, -1), "") == ".whl"
  ami_tags = merge(
    {
      "Name"                      = "${var.ami_name_prefix}-${var.distro}"
      "fleet-deployer:distro"     = var.distro
      "fleet-deployer:agent"      = local.is_wheel ? basename(var.agent) : "fleet-deployer==${var.agent}"
      "fleet-deployer:built-at"   = local.build_time
      "fleet-deployer:source-ami" = "{{ .SourceAMI }}"
    },
    var.tags,
  )
  # HCL has no conditional provisioners: without a wheel the upload step sends a small
  # harmless file instead, and provision.sh installs the version from the package index.
  upload    = local.is_wheel ? var.agent : "${path.root}/../scripts/config/agent.yml.example"
  agent_arg = local.is_wheel ? "--wheel /tmp/deployer-agent/${basename(var.agent)}" : "--version ${var.agent}"
  # The same trick for the trust file: always upload something, pass --trust only for a real one.
  trust_upload = var.trust_file != "" ? var.trust_file : "${path.root}/../scripts/config/agent.yml.example"
  trust_arg    = var.trust_file != "" ? "--trust /tmp/deployer-trust/trust.json" : ""
  # `deployer seed` per entry of var.seed ("stage/role/component[=release_id]"), with the agent
  # just installed; run before cloud-init clean, from the builder's instance profile.
  seed_commands = [
    for entry in var.seed : format(
      "sudo /opt/deployer/venv/bin/deployer seed --bucket %s --prefix %s --region %s --stage %s --role %s --component %s%s",
      var.seed_bucket, var.seed_prefix, var.region,
      split("/", split("=", entry)[0])[0], split("/", split("=", entry)[0])[1], split("/", split("=", entry)[0])[2],
      length(split("=", entry)) > 1 ? " --release-id ${split("=", entry)[1]}" : "",
    )
  ]
}

source "amazon-ebs" "base" {
  region        = var.region
  ami_regions   = var.ami_regions
  instance_type = var.instance_type
  ami_name      = "${var.ami_name_prefix}-${var.distro}-${local.build_time}"
  ssh_username  = local.base.ssh_username

  source_ami_filter {
    filters = {
      name                = local.base.name
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = [local.base.owner]
    most_recent = true
  }

  # IMDSv2 is required where it matters, on the fleet's instances, by the launch template
  # (MetadataOptions.HttpTokens=required, see docs/). metadata_options / imds_support here
  # would also cover the builder, but the Packer 1.6 CI validates with does not know them.

  tags          = local.ami_tags
  snapshot_tags = local.ami_tags
}

build {
  sources = ["source.amazon-ebs.base"]

  provisioner "shell" {
    inline = ["mkdir -p /tmp/deployer-scripts /tmp/deployer-agent /tmp/deployer-trust"]
  }

  provisioner "file" {
    source      = "${path.root}/../scripts/"
    destination = "/tmp/deployer-scripts"
  }

  provisioner "file" {
    source      = local.upload
    destination = "/tmp/deployer-agent/"
  }

  provisioner "file" {
    source      = local.trust_upload
    destination = "/tmp/deployer-trust/trust.json"
  }

  provisioner "shell" {
    # Wait for cloud-init on the builder: it may still hold the package manager's lock.
    inline = concat(
      [
        "cloud-init status --wait >/dev/null || true",
        "sudo bash /tmp/deployer-scripts/provision.sh ${local.agent_arg} ${local.trust_arg}",
      ],
      # Releases baked in: files and their checksum record only; the image carries no state.
      local.seed_commands,
      [
        "sudo rm -rf /tmp/deployer-scripts /tmp/deployer-agent /tmp/deployer-trust",
        # The AMI must boot like a new machine: cloud-init runs again and no state is carried.
        "sudo cloud-init clean --logs",
      ],
    )
  }
}
