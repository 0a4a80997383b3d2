# Kept alone in this file: current Packer needs the block (`packer init .` installs the Amazon
# plugin), while the Packer in Debian (1.6.6, Amazon builder built in) rejects it, so CI
# validates the other files without this one. Build with a current Packer.
packer {
  required_version = ">= 1.9.0"
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.2.0"
    }
  }
}
