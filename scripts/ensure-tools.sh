#!/usr/bin/env bash
# Installs what building and running the fleet needs on a fresh Debian machine, skipping
# what is already there: a C toolchain (for aws-lc-sys), curl, python3 (used by the
# scripts), and Rust through rustup (Debian's own cargo is too old for this workspace).
set -euo pipefail

need_apt=()
command -v cc >/dev/null || need_apt+=(build-essential)
command -v curl >/dev/null || need_apt+=(curl ca-certificates)
command -v python3 >/dev/null || need_apt+=(python3)
command -v kill >/dev/null || need_apt+=(procps)
if ((${#need_apt[@]})); then
    echo "installing ${need_apt[*]} ..."
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${need_apt[@]}"
fi

if ! command -v cargo >/dev/null && [[ ! -x "$HOME/.cargo/bin/cargo" ]]; then
    echo "installing Rust with rustup ..."
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt,clippy
fi
