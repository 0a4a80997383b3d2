# Inputs shared by the agent and relay images. AMIs cannot be copied between the aws and
# aws-us-gov partitions: build the agent in GovCloud and the relay in Commercial, each with
# its own credentials, e.g.
#   packer build -only='agent.*' -var partition=aws-us-gov -var region=us-gov-west-1 images/packer
#   packer build -only='relay.*' -var partition=aws -var region=us-east-1 images/packer

variable "partition" {
  type        = string
  description = "AWS partition of the build (required): aws-us-gov for the agent, aws for the relay."
  validation {
    condition     = contains(["aws", "aws-us-gov"], var.partition)
    error_message = "The partition must be \"aws\" or \"aws-us-gov\"."
  }
}

variable "region" {
  type        = string
  default     = ""
  description = "Region to build in; empty picks us-gov-west-1 in aws-us-gov and us-east-1 in aws."
}

variable "arch" {
  type        = string
  default     = "x86_64"
  description = "CPU architecture of the image and of the binaries in binary_dir: x86_64 or arm64."
  validation {
    condition     = contains(["x86_64", "arm64"], var.arch)
    error_message = "The arch must be \"x86_64\" or \"arm64\"."
  }
}

variable "al2023_kernel" {
  type        = string
  default     = "6.1"
  description = "Kernel line of the Amazon Linux 2023 base image (6.1 or 6.12)."
}

variable "instance_type" {
  type        = string
  default     = ""
  description = "Build instance type; empty picks t3.small for x86_64 and t4g.small for arm64."
}

variable "subnet_id" {
  type        = string
  default     = ""
  description = "Subnet for the build instance; empty uses the default VPC."
}

variable "associate_public_ip_address" {
  type        = bool
  default     = true
  description = "Give the build instance a public IP so Packer can reach it over SSH."
}

variable "ssh_interface" {
  type        = string
  default     = "public_ip"
  description = "How Packer reaches the build instance: public_ip, private_ip or session_manager."
}

variable "iam_instance_profile" {
  type        = string
  default     = ""
  description = "Instance profile of the build instance (needed for ssh_interface = session_manager)."
}

variable "ssh_source_cidrs" {
  type        = list(string)
  default     = ["0.0.0.0/0"]
  description = "Sources admitted to SSH by Packer's temporary security group; narrow it to your address."
}

variable "kms_key_id" {
  type        = string
  default     = ""
  description = "KMS key for the encrypted root volume and snapshot; empty uses the account's default EBS key (alias/aws/ebs). Use a customer key to share the AMI with other accounts."
}

variable "xpart_version" {
  type        = string
  default     = "dev"
  description = "xpart version recorded in the AMI name and tags."
}

variable "binary_dir" {
  type        = string
  default     = ""
  description = "Directory holding the Linux release binaries for arch (xpart-agent, xpart-relay, xpart), the daemons built with --features fips (fips/build --release --bins: target/fips/release) unless fips = false; empty means target/release of this repository."
}

variable "fips" {
  type        = bool
  default     = true
  description = "Whether the image carries FIPS builds of the daemon (fips/build, docs/FIPS.md); the build stops on a daemon that is not (images/packer/check-fips.sh). false builds a non-FIPS image for stacks with FipsMode false."
}

variable "objcopy" {
  type        = string
  default     = "objcopy"
  description = "objcopy that splits the debug info off the binaries before upload; for arm64 binaries built on x86_64, aarch64-linux-gnu-objcopy or llvm-objcopy."
}

locals {
  repo_root  = "${path.root}/../.."
  images_dir = "${path.root}/.."
  binary_dir = var.binary_dir != "" ? var.binary_dir : "${local.repo_root}/target/release"
  # What each image ships (stripped binaries), and their debug info in .debug/, per role so
  # the agent and relay builds can run at once.
  stripped_dir = "${local.binary_dir}/image"

  region        = var.region != "" ? var.region : (var.partition == "aws-us-gov" ? "us-gov-west-1" : "us-east-1")
  instance_type = var.instance_type != "" ? var.instance_type : (var.arch == "arm64" ? "t4g.small" : "t3.small")
  build_time    = formatdate("YYYYMMDD-hhmm", timestamp())
  fips_suffix   = var.fips ? "-fips" : ""

  # Owned by Amazon in every partition; "al2023-ami-minimal-*" would match too without the
  # name's "ami-2023" prefix, and the minimal image lacks the aws CLI that xpart-boot uses.
  base_ami_name = "al2023-ami-2023.*-kernel-${var.al2023_kernel}-${var.arch}"

  tags = {
    "xpart:version"   = var.xpart_version
    "xpart:partition" = var.partition
    "xpart:arch"      = var.arch
    "xpart:fips"      = var.fips ? "true" : "false"
    "xpart:base-ami"  = "{{ .SourceAMI }}"
  }
}
