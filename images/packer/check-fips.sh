#!/bin/sh
# Refuses daemon binaries whose build is not the one the image is meant to carry. install.sh
# runs it on the Packer build instance, where the binaries run (the image's OS and
# architecture), before anything is installed:
#
#   check-fips.sh true|false BINARY...
#
# true (Packer's -var fips=true, the default): each BINARY must be a FIPS build, made with
# `fips/build --release` (docs/FIPS.md), whose module has a FIPS 140-3 certificate; false:
# none may be, so that the image's xpart:fips tag and name say what it holds. A FIPS build
# says so itself: its --version has "(fips)" after the version, then the module it runs and
# that module's certificate ("module AWS-LC FIPS 3.1.0, certificate #5314"), or "no
# certificate" for a module built from another lock (a plain `cargo build --features fips`).
set -eu
if [ "$#" -lt 2 ] || { [ "$1" != true ] && [ "$1" != false ]; }; then
    echo "usage: check-fips.sh true|false BINARY..." >&2
    exit 2
fi
want=$1
shift
for binary in "$@"; do
    if ! version=$("$binary" --version 2>&1); then
        echo "check-fips.sh: $binary --version failed: $version (a binary for another architecture, or built against a newer glibc than Amazon Linux 2023's?)" >&2
        exit 1
    fi
    case "$version" in
        *"(fips)"*) built=true ;;
        *) built=false ;;
    esac
    if [ "$built" != "$want" ]; then
        if [ "$want" = true ]; then
            echo "check-fips.sh: $binary is not a FIPS build (its --version says \"$version\"): build the daemons with fips/build --release -p xpart-agent -p xpart-relay --bins (images/README.md), or build a non-FIPS image with -var fips=false" >&2
        else
            echo "check-fips.sh: $binary is a FIPS build (\"$version\") but the image is built with -var fips=false: drop -var fips=false, or build the daemons without --features fips" >&2
        fi
        exit 1
    fi
    case "$want:$version" in
        true:*"certificate #"*) ;;
        true:*)
            echo "check-fips.sh: $binary is a FIPS build on a module without a FIPS 140-3 certificate (its --version says \"$version\"): build it with fips/build --release -p xpart-agent -p xpart-relay --bins, which holds the build on the certified module (docs/FIPS.md)" >&2
            exit 1
            ;;
    esac
    echo "check-fips.sh: $binary: $version"
done
