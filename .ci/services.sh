# shellcheck shell=bash
# Services for promptsys's scale-out setup (issue 5): Debian's redis-server and PostgreSQL, and an MLflow
# tracking server on PostgreSQL. Source it, then call the functions:
#
#   . .ci/services.sh
#   services_install            # apt-get install what is missing (redis-server, postgresql); CI calls this
#   services_start [DIR]        # start redis, postgres and `mlflow server` on loopback, state in DIR
#                               # (default /tmp/promptsys-services); prints the URLs and exports
#                               # PROMPTSYS_REDIS_URL and PROMPTSYS_MLFLOW__TRACKING_URI
#   services_stop [DIR]         # stop all three
#
# The tests (tests/test_scaleout.py) start and stop their own servers on free ports; they only need the
# binaries, i.e. `services_install`. services_start is the documented team setup on one box, and a way to
# try it by hand. Ports: PROMPTSYS_REDIS_PORT (6390), PROMPTSYS_PG_PORT (5440), PROMPTSYS_MLFLOW_PORT (5050).

_pg_bindir() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -rV); do
    [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
  done
  command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
  return 1
}

services_install() {
  local need=()
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  _pg_bindir >/dev/null || need+=(postgresql)
  if [ ${#need[@]} -gt 0 ]; then
    echo "services: installing ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  # Debian's packages try to start their own instances; we never use those (policy-rc.d may have stopped them).
  redis-server --version | head -1
  "$(_pg_bindir)/postgres" --version
}

_wait_port() {  # host port seconds
  local i
  for i in $(seq 1 $(( $3 * 10 ))); do
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

services_start() {
  local dir=${1:-/tmp/promptsys-services}
  local rport=${PROMPTSYS_REDIS_PORT:-6390} pport=${PROMPTSYS_PG_PORT:-5440} mport=${PROMPTSYS_MLFLOW_PORT:-5050}
  local py=${PYTHON:-.venv/bin/python} bin
  bin=$(_pg_bindir) || { echo "services: PostgreSQL is not installed (services_install)"; return 1; }
  mkdir -p "$dir/redis" "$dir/artifacts"
  # Redis: loopback only, no persistence (cache, breaker and budget state are rebuilt; use AOF if budgets must survive restarts)
  redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --pidfile "$dir/redis/redis.pid" --logfile "$dir/redis/redis.log" --dir "$dir/redis"
  # PostgreSQL: refuses to run as root, so the data dir belongs to the postgres user
  local as=()
  [ "$(id -u)" = 0 ] && as=(runuser -u postgres --)
  if [ ! -d "$dir/pg/data" ]; then
    mkdir -p "$dir/pg"; [ ${#as[@]} -gt 0 ] && chown postgres:postgres "$dir/pg"
    "${as[@]}" "$bin/initdb" -D "$dir/pg/data" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  "${as[@]}" "$bin/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/log" -w -o "-p $pport -k $dir/pg -c listen_addresses=127.0.0.1" start >/dev/null
  "${as[@]}" "$bin/psql" -h 127.0.0.1 -p "$pport" -U postgres -tc "SELECT 1 FROM pg_database WHERE datname='mlflow'" | grep -q 1 \
    || "${as[@]}" "$bin/psql" -h 127.0.0.1 -p "$pport" -U postgres -qc "CREATE DATABASE mlflow"
  # MLflow: one worker, no job-execution workers (they would outlive a stop), artifacts served by the server
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true setsid "$py" -m mlflow server \
    --backend-store-uri "postgresql+psycopg://postgres@127.0.0.1:$pport/mlflow" \
    --artifacts-destination "$dir/artifacts" --serve-artifacts \
    --host 127.0.0.1 --port "$mport" --workers 1 >"$dir/mlflow.log" 2>&1 &
  echo $! >"$dir/mlflow.pid"
  _wait_port 127.0.0.1 "$rport" 15 || { echo "services: redis did not start"; return 1; }
  _wait_port 127.0.0.1 "$mport" 240 || { echo "services: mlflow did not start (see $dir/mlflow.log)"; return 1; }
  export PROMPTSYS_REDIS_URL="redis://127.0.0.1:$rport/0"
  export PROMPTSYS_MLFLOW__TRACKING_URI="http://127.0.0.1:$mport"
  echo "redis:      $PROMPTSYS_REDIS_URL"
  echo "postgresql: postgresql+psycopg://postgres@127.0.0.1:$pport/mlflow"
  echo "mlflow:     $PROMPTSYS_MLFLOW__TRACKING_URI  (artifacts in $dir/artifacts)"
}

services_stop() {
  local dir=${1:-/tmp/promptsys-services} bin as=()
  [ "$(id -u)" = 0 ] && as=(runuser -u postgres --)
  if [ -f "$dir/mlflow.pid" ]; then
    kill -TERM -- "-$(cat "$dir/mlflow.pid")" 2>/dev/null || kill "$(cat "$dir/mlflow.pid")" 2>/dev/null || true
    rm -f "$dir/mlflow.pid"
  fi
  [ -f "$dir/redis/redis.pid" ] && { kill "$(cat "$dir/redis/redis.pid")" 2>/dev/null || true; }
  if bin=$(_pg_bindir) && [ -f "$dir/pg/data/postmaster.pid" ]; then
    "${as[@]}" "$bin/pg_ctl" -D "$dir/pg/data" -m fast -w stop >/dev/null || true
  fi
  echo "services: stopped"
}
