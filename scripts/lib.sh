# shellcheck shell=bash
# Helpers shared by scripts/kafka, scripts/pg, scripts/stack and scripts/test. Sourced, not run.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC2034 # used by the scripts that source this file
CACHE="${HOOKLINE_CACHE:-$REPO/.cache}"

die() {
    printf '%s: error: %s\n' "${0##*/}" "$*" >&2
    exit 1
}

warn() {
    printf '%s: %s\n' "${0##*/}" "$*" >&2
}

# apt_install PKG... : install Debian packages (needs root); used only when a tool is missing.
apt_install() {
    [[ $EUID -eq 0 ]] || die "missing $*; install it (apt-get install $*) or run as root"
    command -v apt-get >/dev/null || die "missing $* and no apt-get to install it"
    warn "installing $* with apt-get"
    local log
    log="$(mktemp)"
    if ! {
        DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
    } >"$log" 2>&1 </dev/null; then
        tail -n 30 "$log" >&2
        rm -f "$log"
        die "apt-get install $* failed"
    fi
    rm -f "$log"
}

# port_open PORT : true when something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# proc_state PID : the one-letter state from /proc (R, S, Z, ...); empty when gone. (No procps needed.)
proc_state() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
    stat="${stat##*) }"
    printf '%s\n' "${stat%% *}"
}

# pid_alive PIDFILE [WORD] : true when the pid file names a live process (whose command line
# contains WORD, if given: guards against a stale pid file and a recycled pid); prints the pid.
pid_alive() {
    local pid
    [[ -s $1 ]] || return 1
    pid="$(<"$1")"
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    # A zombie (e.g. our own unreaped child) counts as dead.
    [[ "$(proc_state "$pid")" != Z ]] || return 1
    if [[ -n ${2:-} ]]; then
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2" || return 1
    fi
    printf '%s\n' "$pid"
}

# wait_gone PID SECONDS : wait for a process to exit; false on timeout.
wait_gone() {
    local pid=$1 deadline=$((SECONDS + $2))
    while kill -0 "$pid" 2>/dev/null && [[ "$(proc_state "$pid")" != Z ]]; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

# service_env CMD... : runs CMD with a cleared environment: PATH, HOME, TMPDIR, the locale,
# JAVA_HOME and every HOOKLINE_* variable (ports, cache and run directories), nothing else. A
# variable of the caller's shell (JAVA_TOOL_OPTIONS, KAFKA_OPTS, KAFKA_HEAP_OPTS, PGOPTIONS,
# PGDATA, LD_PRELOAD, http_proxy, ...) then cannot change the test services they start.
service_env() {
    local -a service_vars=("PATH=$PATH" "HOME=${HOME:-/root}")
    local name
    for name in TMPDIR LANG LC_ALL JAVA_HOME; do
        if [[ -n ${!name:-} ]]; then service_vars+=("$name=${!name}"); fi
    done
    while IFS= read -r name; do
        service_vars+=("$name=${!name}")
    done < <(compgen -e | grep '^HOOKLINE_' || true)
    env -i "${service_vars[@]}" "$@"
}
