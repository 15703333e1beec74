#!/usr/bin/env sh
# Prestart step of the service: wait for the database, bring its schema to the latest migration,
# then run the given command (if any), e.g. `prestart.sh sparseshot serve --host 0.0.0.0 --no-migrate`.
set -eu

tries=${SPARSESHOT_PRESTART_TRIES:-30}
i=1
until sparseshot migrate; do
  if [ "$i" -ge "$tries" ]; then
    echo "prestart: database not reachable after $tries tries" >&2
    exit 1
  fi
  echo "prestart: migration failed (database not up yet?), retrying in 2s ($i/$tries)" >&2
  i=$((i + 1))
  sleep 2
done

if [ "$#" -gt 0 ]; then
  exec "$@"
fi
