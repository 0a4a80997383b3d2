#!/bin/sh
# Splits release binaries into what an image ships and what the build keeps. Packer runs it on
# the build host before uploading (agent.pkr.hcl, relay.pkr.hcl):
#
#   split-debug.sh OUT_DIR BINARY...
#
# For each BINARY it writes OUT_DIR/NAME without debug sections (the symbol table stays, so a
# backtrace still names every function) and OUT_DIR/.debug/NAME.debug with the debug info
# (the release profile's line tables), linked by .gnu_debuglink. A Rust backtrace, gdb and
# addr2line find NAME.debug in a `.debug/` directory beside the binary, beside it, or under
# /usr/lib/debug/<binary's directory>/, and then print file and line too.
#
# OBJCOPY names the objcopy to use (default objcopy); for binaries of another architecture
# use that architecture's binutils (aarch64-linux-gnu-objcopy) or llvm-objcopy.
set -eu
objcopy="${OBJCOPY:-objcopy}"
if [ "$#" -lt 2 ]; then
    echo "usage: split-debug.sh OUT_DIR BINARY..." >&2
    exit 2
fi
out=$1
shift
if ! command -v "$objcopy" >/dev/null 2>&1; then
    echo "split-debug.sh: $objcopy not found: install binutils, or set OBJCOPY (packer: -var objcopy=...)" >&2
    exit 1
fi
for binary in "$@"; do
    if [ ! -f "$binary" ]; then
        echo "split-debug.sh: no release binary $binary: run fips/build --release --bins and pass -var binary_dir=$PWD/target/fips/release, or cargo build --release for a non-FIPS image (images/README.md, section 3), or set binary_dir" >&2
        exit 1
    fi
done
mkdir -p "$out/.debug"
for binary in "$@"; do
    name=$(basename "$binary")
    "$objcopy" --only-keep-debug "$binary" "$out/.debug/$name.debug"
    # Written beside the target and renamed, so an interrupted run never leaves a half binary
    # for Packer to upload.
    "$objcopy" --strip-debug --add-gnu-debuglink="$out/.debug/$name.debug" "$binary" "$out/.$name.tmp"
    mv "$out/.$name.tmp" "$out/$name"
done
