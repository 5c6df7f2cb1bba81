#!/usr/bin/env bash
# A shared MLflow tracking server: PostgreSQL backend store (runs, params, metrics, Model Registry) and an
# artifact store (a local folder, or an S3-compatible bucket) that the server proxies, so that clients
# (laptops, Ray workers) need only the server's URL, never database or bucket credentials.
#
#   mlflow/server.sh serve --backend-store-uri postgresql://mlflow:PASS@db.internal:5432/mlflow \
#       --artifacts-destination s3://team-bucket/mlflow      # on 127.0.0.1: behind a TLS proxy (README)
#   mlflow/server.sh local-postgres /srv/mlflow-pg      # a throw-away PostgreSQL on 127.0.0.1 (prints its URI)
#   mlflow/server.sh serve --backend-store-uri "$(cat /srv/mlflow-pg/backend-uri)"
#   mlflow/server.sh upgrade --backend-store-uri URI    # after an MLflow version bump, server stopped
#   mlflow/server.sh stop-postgres /srv/mlflow-pg
#
# Every option also comes from the environment (flags win): MLFLOW_BACKEND_STORE_URI,
# MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_HOST (127.0.0.1), MLFLOW_PORT (5000), MLFLOW_WORKERS (4),
# MLFLOW_ALLOWED_HOSTS, MLFLOW_SERVER_ENABLE_JOB_EXECUTION (false), MLFLOW_BIN (the checkout's
# .venv/bin/mlflow, else `mlflow` on PATH). For local-postgres: PG_BIN (the newest
# /usr/lib/postgresql/*/bin), PG_PORT (5432), PG_RUN_AS (postgres; used when this runs as root, which
# PostgreSQL refuses). An s3:// destination reads the usual boto3 settings in the server's environment:
# AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, and MLFLOW_S3_ENDPOINT_URL for an
# S3-compatible store (MinIO, Ceph, ...). See mlflow/README.md.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

die() {
    echo "error: $*" >&2
    exit 2
}

# postgresql://user:secret@host/db -> postgresql://user:***@host/db (the URI goes to logs)
masked() {
    sed -E 's#(://[^:/@]+):[^@]*@#\1:***@#' <<<"$1"
}

mlflow_bin() {
    if [[ -n "${MLFLOW_BIN:-}" ]]; then
        echo "$MLFLOW_BIN"
    elif [[ -x "$REPO/.venv/bin/mlflow" ]]; then
        echo "$REPO/.venv/bin/mlflow"
    elif command -v mlflow >/dev/null; then
        command -v mlflow
    else
        die "no mlflow executable: run 'make setup' in $REPO or set MLFLOW_BIN"
    fi
}

serve() {
    local backend="${MLFLOW_BACKEND_STORE_URI:-}"
    local artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$REPO/.mlflow-server/artifacts}"
    local host="${MLFLOW_HOST:-127.0.0.1}" port="${MLFLOW_PORT:-5000}" workers="${MLFLOW_WORKERS:-4}"
    local allowed="${MLFLOW_ALLOWED_HOSTS:-}"
    local extra=()
    while (($#)); do
        case "$1" in
            --backend-store-uri) backend="${2:?--backend-store-uri needs a value}"; shift 2 ;;
            --artifacts-destination) artifacts="${2:?--artifacts-destination needs a value}"; shift 2 ;;
            --host) host="${2:?--host needs a value}"; shift 2 ;;
            --port) port="${2:?--port needs a value}"; shift 2 ;;
            --workers) workers="${2:?--workers needs a value}"; shift 2 ;;
            --allowed-hosts) allowed="${2:?--allowed-hosts needs a value}"; shift 2 ;;
            --) shift; extra=("$@"); break ;;
            -h | --help) usage; exit 0 ;;
            *) die "serve: unknown option '$1' (options after -- go to 'mlflow server' as they are)" ;;
        esac
    done
    [[ -n "$backend" ]] || die "serve: --backend-store-uri (or MLFLOW_BACKEND_STORE_URI) is required, e.g. \
postgresql://mlflow:PASS@127.0.0.1:5432/mlflow; 'mlflow/server.sh local-postgres DIR' makes a local one"
    case "$backend" in
        postgresql://* | postgresql+*://*) ;;
        *) die "serve: --backend-store-uri must be a postgresql:// URI for a shared server, got \
'$(masked "$backend")' (the platform's default SQLite store needs no server)" ;;
    esac
    [[ "$port" =~ ^[0-9]+$ ]] || die "serve: --port expects a number, got '$port'"
    [[ "$workers" =~ ^[0-9]+$ ]] || die "serve: --workers expects a number, got '$workers'"
    if [[ "$artifacts" != *://* ]]; then
        # A local folder: absolute, so the server's working directory does not matter.
        mkdir -p "$artifacts"
        artifacts="$(cd "$artifacts" && pwd)"
    fi
    local mlflow
    mlflow="$(mlflow_bin)"
    # SQLAlchemy 2.1 (MLflow's) reads postgresql:// with psycopg 3; postgresql+psycopg2:// with psycopg2.
    # A missing driver is one line here, not a traceback from every server worker later.
    local driver=psycopg package="psycopg[binary]"
    if [[ "$backend" == postgresql+psycopg2://* ]]; then
        driver=psycopg2 package=psycopg2-binary
    fi
    local python
    python="$(dirname "$mlflow")/python"
    if [[ -x "$python" ]] && ! "$python" -c "import $driver" 2>/dev/null; then
        die "serve: the PostgreSQL driver is missing: pip install '$package' (into the env of $mlflow)"
    fi
    # The backend URI (with its password) reaches `mlflow server` through the environment, which it reads,
    # not its command line, which every user of the machine can see.
    export MLFLOW_BACKEND_STORE_URI="$backend"
    local args=(server --host "$host" --port "$port" --workers "$workers"
        --serve-artifacts --artifacts-destination "$artifacts")
    if [[ -n "$allowed" ]]; then
        args+=(--allowed-hosts "$allowed")
    fi
    # MLflow's server-side job runner (GenAI scorers, prompt optimisation: nothing the platform uses) is
    # eight more processes; off unless asked for.
    export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
    echo "MLflow server on http://$host:$port  backend $(masked "$backend")  artifacts $artifacts" >&2
    # exec: SIGTERM/SIGINT from a supervisor (systemd, a test) reach the server itself.
    exec "$mlflow" "${args[@]}" "${extra[@]}"
}

upgrade() {
    local backend="${MLFLOW_BACKEND_STORE_URI:-}"
    while (($#)); do
        case "$1" in
            --backend-store-uri) backend="${2:?--backend-store-uri needs a value}"; shift 2 ;;
            *) die "upgrade: unknown option '$1'" ;;
        esac
    done
    [[ -n "$backend" ]] || die "upgrade: --backend-store-uri (or MLFLOW_BACKEND_STORE_URI) is required"
    echo "upgrading the schema of $(masked "$backend") (back it up first: pg_dump)" >&2
    exec "$(mlflow_bin)" db upgrade "$backend"
}

pg_bin() {
    if [[ -n "${PG_BIN:-}" ]]; then
        echo "$PG_BIN"
        return
    fi
    local newest
    newest="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    [[ -n "$newest" && -x "$newest/initdb" ]] ||
        die "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin: apt-get install postgresql, \
or set PG_BIN"
    echo "$newest"
}

# Runs a PostgreSQL server binary as an unprivileged user when we are root.
as_pg_user() {
    if ((EUID == 0)); then
        local user="${PG_RUN_AS:-postgres}"
        id -u "$user" >/dev/null 2>&1 ||
            die "running as root: PostgreSQL refuses root and user '$user' does not exist; set PG_RUN_AS"
        runuser -u "$user" -- "$@"
    else
        "$@"
    fi
}

local_postgres() {
    local dir="${1:?local-postgres needs a folder: mlflow/server.sh local-postgres DIR}"
    local port="${PG_PORT:-5432}" bin password
    [[ "$port" =~ ^[0-9]+$ ]] || die "local-postgres: PG_PORT expects a number, got '$port'"
    bin="$(pg_bin)"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    if ((EUID == 0)); then
        chown "${PG_RUN_AS:-postgres}" "$dir"
        as_pg_user test -w "$dir" ||
            die "local-postgres: user ${PG_RUN_AS:-postgres} cannot write $dir (a parent folder not \
traversable?); pick a folder such as /tmp/mlflow-pg"
    fi
    if [[ ! -f "$dir/data/PG_VERSION" ]]; then
        # A random password, kept only in files readable by the owner of $dir.
        password="$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 24)"
        (umask 077 && printf '%s\n' "$password" >"$dir/pwfile")
        if ((EUID == 0)); then
            chown "${PG_RUN_AS:-postgres}" "$dir/pwfile"
        fi
        as_pg_user "$bin/initdb" -D "$dir/data" -U mlflow --pwfile="$dir/pwfile" \
            --auth-local=scram-sha-256 --auth-host=scram-sha-256 --encoding=UTF8 --locale=C >"$dir/initdb.log"
        mkdir -p "$dir/socket"
        if ((EUID == 0)); then
            chown "${PG_RUN_AS:-postgres}" "$dir/socket"
        fi
    fi
    password="$(cat "$dir/pwfile")"
    # Bound to 127.0.0.1 only; the socket lives in $dir, not in /var/run/postgresql (which may not exist).
    as_pg_user "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$dir/socket" start >&2 ||
        die "local-postgres: the server did not start; see $dir/postgres.log"
    if ! PGPASSWORD="$password" "$bin/psql" -h 127.0.0.1 -p "$port" -U mlflow -d postgres -tAc \
        "select 1 from pg_database where datname = 'mlflow'" | grep -q 1; then
        PGPASSWORD="$password" "$bin/createdb" -h 127.0.0.1 -p "$port" -U mlflow mlflow
    fi
    local uri="postgresql://mlflow:$password@127.0.0.1:$port/mlflow"
    (umask 077 && printf '%s\n' "$uri" >"$dir/backend-uri")
    echo "PostgreSQL on 127.0.0.1:$port, data in $dir/data; stop: $0 stop-postgres $dir" >&2
    echo "$uri"
}

stop_postgres() {
    local dir="${1:?stop-postgres needs the folder given to local-postgres}"
    local bin
    bin="$(pg_bin)"
    [[ -f "$dir/data/postmaster.pid" ]] || { echo "no PostgreSQL running in $dir" >&2; return 0; }
    as_pg_user "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >&2
}

command="${1:-}"
if [[ "$command" == --* && "$command" != --help ]]; then
    command=serve # `server.sh --backend-store-uri ...` is `server.sh serve --backend-store-uri ...`
elif (($#)); then
    shift
fi
case "$command" in
    serve) serve "$@" ;;
    upgrade) upgrade "$@" ;;
    local-postgres) local_postgres "$@" ;;
    stop-postgres) stop_postgres "$@" ;;
    "" | -h | --help | help) usage ;;
    *) die "unknown command '$command'; valid: serve, upgrade, local-postgres, stop-postgres" ;;
esac
