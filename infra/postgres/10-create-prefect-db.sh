#!/bin/sh
# Run by the postgres image's entrypoint from /docker-entrypoint-initdb.d, once, when the data
# directory is empty: POSTGRES_DB (mlflow) already exists; this adds Prefect's database, owned by
# the same user. Nothing secret here: the entrypoint connects over the local socket.
set -eu
db="${PREFECT_DB:-prefect}"
if psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" -tAc \
    "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
  echo "database $db already exists"
else
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -c "CREATE DATABASE \"$db\" OWNER \"$POSTGRES_USER\""
fi
