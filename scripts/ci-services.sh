#!/usr/bin/env bash
# Start the local PostgreSQL and Redis used by the tests when they are not running (CI machines
# stop them between sessions), and the browser used by the console test. Harmless when they are up
# or when the servers are not installed.
set -u
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
fi
if command -v redis-server >/dev/null 2>&1; then
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
  fi
fi
# Headless Chromium and its driver for the browser test of the web console (Debian's packages;
# no browser download is needed). Installed when missing and apt-get can run as root.
if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } && command -v apt-get >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ]; then
  echo "installing chromium and chromium-driver (apt-get)"
  { apt-get install -y -q chromium chromium-driver || { apt-get update -q && apt-get install -y -q chromium chromium-driver; }; } \
    >/tmp/sparseshot-apt-chromium.log 2>&1 || echo "warning: chromium install failed (see /tmp/sparseshot-apt-chromium.log)"
fi
for _ in $(seq 1 30); do
  pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && exit 0
  sleep 1
done
exit 0
