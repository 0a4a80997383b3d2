#!/bin/sh
# Runs as root on the Packer build instance. Installs what the file provisioners staged in
# /tmp/xpart-staging for XPART_ROLE (agent or relay) and enables the units without starting
# them, once the daemon has shown it is the build XPART_FIPS (Packer's fips) asks for. No key, token or deployment value goes into the image: at first boot the user data
# writes /etc/xpart/deployment.env and xpart-boot fetches the secrets with the instance role.
set -eu
role="${XPART_ROLE:-}"
case "$role" in
    agent | relay) ;;
    *) echo "install.sh: XPART_ROLE must be agent or relay, not \"$role\"" >&2; exit 1 ;;
esac
staging=/tmp/xpart-staging
images="$staging/images"

# Before anything is installed: a FIPS image carries a FIPS build of the daemon, which says so
# itself, and runs it here, on the image's own OS and architecture.
sh "$images/packer/check-fips.sh" "${XPART_FIPS:-}" "$staging/bin/xpart-$role"

# Part of the standard AL2023 image already; listed because xpart-boot and the units use them.
dnf install -y --setopt=install_weak_deps=False awscli-2 iproute logrotate

install -m 0755 -o root -g root "$staging/bin/xpart-$role" "$staging/bin/xpart" /usr/local/bin/
install -D -m 0755 -o root -g root "$images/cloud-init/xpart-boot" /usr/local/libexec/xpart/xpart-boot

install -D -m 0644 "$images/sysusers.d/xpart.conf" /usr/lib/sysusers.d/xpart.conf
systemd-sysusers /usr/lib/sysusers.d/xpart.conf
install -D -m 0644 "$images/sysctl.d/60-xpart.conf" /usr/lib/sysctl.d/60-xpart.conf
install -D -m 0644 "$images/modules-load.d/xpart.conf" /usr/lib/modules-load.d/xpart.conf
install -D -m 0644 "$images/logrotate.d/xpart" /etc/logrotate.d/xpart
# CloudWatch for teams without Prometheus: the audit file to CloudWatch Logs, key metrics
# scraped from the admin port to CloudWatch (images/cloudwatch; the stacks' alarms use them).
dnf install -y --setopt=install_weak_deps=False amazon-cloudwatch-agent
install -D -m 0644 "$images/cloudwatch/amazon-cloudwatch-agent.json" /opt/aws/amazon-cloudwatch-agent/etc/amazon-cloudwatch-agent.json
install -D -m 0644 "$images/cloudwatch/prometheus.yaml" /opt/aws/amazon-cloudwatch-agent/etc/xpart-prometheus.yaml

# /etc/xpart: configuration readable by the service group, written by root (xpart-boot);
# the key files inside are 0600 and owned by xpart.
install -d -m 0750 -o root -g xpart /etc/xpart
install -d -m 0750 -o xpart -g xpart /var/log/xpart

install -D -m 0644 "$staging/config/$role.example.toml" "/usr/local/share/doc/xpart/$role.example.toml"
install -D -m 0644 "$images/README.md" /usr/local/share/doc/xpart/README.md

units="xpart-boot.service xpart-signal.service xpart-$role.service"
if [ "$role" = agent ]; then
    units="$units xpart-floating-address.service xpart-failover-watch.service"
fi
for unit in $units; do
    install -m 0644 "$images/systemd/$unit" "/usr/lib/systemd/system/$unit"
done
systemctl daemon-reload
# Enabled, not started: each unit waits for the configuration cloud-init writes at first boot.
# shellcheck disable=SC2086
systemctl enable $units logrotate.timer amazon-cloudwatch-agent.service

rm -rf "$staging"
# The next boot is a new instance: let cloud-init run the user data again and drop build logs.
cloud-init clean --logs
