#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to build Causeway: pingora builds zlib-ng
# through cmake and a C compiler.
set -euo pipefail
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v cc >/dev/null 2>&1 || missing+=(gcc)
[ ${#missing[@]} -eq 0 ] && exit 0
echo "causeway: installing build dependencies: ${missing[*]}" >&2
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
if command -v apt-get >/dev/null 2>&1; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
else
  echo "causeway: please install ${missing[*]} with your package manager, then retry" >&2
  exit 1
fi
