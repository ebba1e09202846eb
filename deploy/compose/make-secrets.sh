#!/bin/sh
# The secrets the compose services read, generated once for local use under deploy/compose/secrets/:
#   miner-token       the bearer token every RPC to the miner carries (the miner and the trainers read it)
#   redis-password    the password of Redis (the miner puts it in its Redis URL)
#   ca.crt, ca.key    a self-signed CA of this machine's own (ca.key never leaves this directory)
#   miner.crt/.key    the miner's TLS certificate, for the names miner, localhost and 127.0.0.1, signed by that CA
# Existing files are kept (rerun after deleting one to replace it); --force replaces them all.
#   ./make-secrets.sh [--force] [--days N]
set -eu
cd "$(dirname "$0")"
force=0
days=825
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1 ;;
    --days) days="$2"; shift ;;
    *) echo "usage: $0 [--force] [--days N]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p secrets
chmod 700 secrets  # only this user reads them on the host
[ "$force" = 1 ] && rm -f secrets/miner-token secrets/redis-password secrets/ca.* secrets/miner.*
umask 022  # the containers run as other users and read the files through bind mounts

if [ ! -s secrets/miner-token ]; then
  openssl rand -hex 32 > secrets/miner-token
fi
if [ ! -s secrets/redis-password ]; then
  openssl rand -hex 32 > secrets/redis-password  # hex: nothing to escape in the Redis URL
fi
if [ ! -s secrets/ca.crt ] || [ ! -s secrets/ca.key ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$days" \
    -subj "/CN=helip-local-ca" -keyout secrets/ca.key -out secrets/ca.crt 2>/dev/null
  chmod 600 secrets/ca.key
  rm -f secrets/miner.crt  # a new CA: re-issue the miner's certificate
fi
if [ ! -s secrets/miner.crt ] || [ ! -s secrets/miner.key ]; then
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=miner" \
    -keyout secrets/miner.key -out secrets/miner.csr 2>/dev/null
  printf 'subjectAltName=DNS:miner,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > secrets/miner.ext
  openssl x509 -req -in secrets/miner.csr -CA secrets/ca.crt -CAkey secrets/ca.key -CAcreateserial \
    -days "$days" -extfile secrets/miner.ext -out secrets/miner.crt 2>/dev/null
  rm -f secrets/miner.csr secrets/miner.ext secrets/ca.srl
  chmod 644 secrets/miner.key  # the miner's container user reads it; the 0700 directory keeps others out
fi
echo "secrets in $(pwd)/secrets: miner-token, redis-password, ca.crt, miner.crt, miner.key"
