#!/usr/bin/env bash
# Installs the servers the remote-cache tests start on 127.0.0.1 (idempotent; fast when done):
#   * moto's S3 server (`moto_server`, PyPI `moto[server]`) in a per-user venv:
#       ${XDG_CACHE_HOME:-~/.cache}/wdro/test-venv/bin/moto_server
#   * nginx with WebDAV (Debian `nginx-full`: the dav module for PUT/DELETE/MKCOL and the dav-ext
#     module for PROPFIND), for the HTTP backend. Needs root (apt-get); without root it prints
#     the command to run and the HTTP tests are skipped with that reason.
# Called by `scripts/setup.sh --test`. The tests find the servers at these paths (or through
# WDRO_MOTO_SERVER / WDRO_NGINX).
set -euo pipefail

cache="${XDG_CACHE_HOME:-$HOME/.cache}/wdro"
venv="$cache/test-venv"
moto_version="5.2.5"

if [ ! -x "$venv/bin/moto_server" ]; then
  echo "setup-test-servers: installing moto[server]==$moto_version into $venv" >&2
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$moto_version"
fi
"$venv/bin/moto_server" --help >/dev/null

have_dav() {
  local nginx="$1"
  [ -x "$nginx" ] || return 1
  # The dav module is built in (nginx -V lists it); PROPFIND comes from the dav-ext module.
  "$nginx" -V 2>&1 | grep -q -- '--with-http_dav_module' || return 1
  ls /usr/lib/nginx/modules/ngx_http_dav_ext_module.so >/dev/null 2>&1 || "$nginx" -V 2>&1 | grep -q dav-ext
}

if ! have_dav /usr/sbin/nginx; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup-test-servers: installing nginx-full (WebDAV) with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # --no-install-recommends; the package's own service is not used (the tests run their own).
    apt-get install -y -qq --no-install-recommends nginx-full libnginx-mod-http-dav-ext >/dev/null
    # Do not leave a system nginx listening on port 80.
    (command -v systemctl >/dev/null && systemctl disable --now nginx >/dev/null 2>&1) || true
    if [ -f /run/nginx.pid ]; then kill "$(cat /run/nginx.pid)" 2>/dev/null || true; fi
  else
    echo "setup-test-servers: nginx with WebDAV is missing; run as root: apt-get install nginx-full libnginx-mod-http-dav-ext (the HTTP remote tests are skipped until then)" >&2
  fi
fi
have_dav /usr/sbin/nginx && echo "setup-test-servers: ok (moto_server in $venv, nginx with WebDAV)" >&2 \
  || echo "setup-test-servers: ok (moto_server in $venv; nginx WebDAV missing)" >&2

# Slurm for tests/slurm_cluster.rs: munge + slurmctld + slurmd from Debian (the test starts its
# own throw-away cluster with scripts/slurm-up.sh; no system daemon is used). Idempotent.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup-test-servers: installing slurmctld slurmd slurm-client munge with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  else
    echo "setup-test-servers: Slurm is missing; run as root: apt-get install --no-install-recommends slurmctld slurmd slurm-client munge (the Slurm tests are skipped until then)" >&2
  fi
fi
command -v slurmctld >/dev/null && echo "setup-test-servers: ok (Slurm $(slurmctld -V 2>/dev/null))" >&2 || true
