#!/usr/bin/env bash
# Debian packages the test suite talks to for real: Redis, Prometheus (server + promtool) and
# docker-compose (to validate the compose file; no Docker engine is needed for that), and openssl
# (a self-signed certificate for the Redis TLS test).
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
# redis-cli joins the test Redis Cluster (redis-cli --cluster create); Debian ships it in redis-tools.
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v prometheus >/dev/null || missing+=(prometheus)
command -v promtool >/dev/null || missing+=(prometheus)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v openssl >/dev/null || missing+=(openssl)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
  echo "missing system packages: ${missing[*]}; install them with apt-get (needs root)" >&2
  exit 1
fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
