# The agent image (GovCloud side). Build it in each GovCloud region you deploy to:
#   packer init images/packer
#   packer build -only='agent.*' -var partition=aws-us-gov -var region=us-gov-west-1 images/packer

source "amazon-ebs" "agent" {
  region          = local.region
  instance_type   = local.instance_type
  ami_name        = "xpart-agent-${var.xpart_version}${local.fips_suffix}-${var.arch}-${local.build_time}"
  ami_description = "xpart agent ${var.xpart_version}${local.fips_suffix} (${var.arch}) on Amazon Linux 2023"

  source_ami_filter {
    filters = {
      name                = local.base_ami_name
      architecture        = var.arch
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = ["amazon"]
    most_recent = true
  }

  # Instances launched from the image default to IMDSv2 only; the build instance too.
  imds_support = "v2.0"
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_type           = "gp3"
    volume_size           = 8
    iops                  = 3000
    throughput            = 125
    encrypted             = true
    kms_key_id            = var.kms_key_id
    delete_on_termination = true
  }

  subnet_id                             = var.subnet_id
  associate_public_ip_address           = var.associate_public_ip_address
  ssh_interface                         = var.ssh_interface
  iam_instance_profile                  = var.iam_instance_profile
  temporary_security_group_source_cidrs = var.ssh_source_cidrs
  ssh_username                          = "ec2-user"
  ssh_clear_authorized_keys             = true

  tags          = merge(local.tags, { Name = "xpart-agent-${var.xpart_version}${local.fips_suffix}-${var.arch}", "xpart:image" = "agent" })
  snapshot_tags = merge(local.tags, { "xpart:image" = "agent" })
  run_tags      = { Name = "packer-xpart-agent" }
}

build {
  name    = "agent"
  sources = ["source.amazon-ebs.agent"]

  provisioner "shell" {
    inline = ["mkdir -p /tmp/xpart-staging/bin /tmp/xpart-staging/images /tmp/xpart-staging/config"]
  }

  # On the machine running Packer: the binaries without their debug info, which stays in
  # .debug/ beside them (split-debug.sh; images/README.md, "Debug info").
  provisioner "shell-local" {
    inline           = ["sh '${path.root}/split-debug.sh' '${local.stripped_dir}/agent' '${local.binary_dir}/xpart-agent' '${local.binary_dir}/xpart'"]
    environment_vars = ["OBJCOPY=${var.objcopy}"]
  }

  # Written by the step above, so Packer checks for them when it uploads, not at validation.
  provisioner "file" {
    sources     = ["${local.stripped_dir}/agent/xpart-agent", "${local.stripped_dir}/agent/xpart"]
    destination = "/tmp/xpart-staging/bin/"
    generated   = true
  }

  # Units, sysctl, logrotate, sysusers, the boot script and the deployment guide.
  provisioner "file" {
    source      = "${local.images_dir}/"
    destination = "/tmp/xpart-staging/images"
  }

  provisioner "file" {
    source      = "${local.repo_root}/config/agent.example.toml"
    destination = "/tmp/xpart-staging/config/agent.example.toml"
  }

  provisioner "shell" {
    script           = "${path.root}/install.sh"
    environment_vars = ["XPART_ROLE=agent", "XPART_FIPS=${var.fips}"]
    execute_command  = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
  }
}
