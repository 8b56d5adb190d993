#!/bin/sh
# Roles of the bone-server image: api | worker | up | healthcheck | anything else is exec'd as given.
set -eu
role="${1:-api}"
case "$role" in
  api|worker|up)
    shift
    exec bone-server "$role" "$@"
    ;;
  healthcheck)
    # The API answers /healthz; a worker is healthy when its process runs (compose restarts it otherwise).
    exec python3 -c "import os,sys,urllib.request; u='http://127.0.0.1:%s/healthz' % os.environ.get('BONE_PORT','8000'); sys.exit(0 if urllib.request.urlopen(u, timeout=4).status == 200 else 1)"
    ;;
  *)
    exec "$@"
    ;;
esac
