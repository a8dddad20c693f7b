# Kept in its own file: Packer >= 1.7 needs this block to install the Amazon plugin
# (`packer init packer/`), while the Packer 1.6 that Debian ships, used by CI's
# `packer validate`, rejects it. CI validates every other file in this directory.
packer {
  required_version = ">= 1.10.0"
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.3.0"
    }
  }
}
