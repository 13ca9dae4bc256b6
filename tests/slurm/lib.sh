# Helpers shared by setup_slurm.sh (the single-node cluster) and setup_two_nodes.sh (the two-node one).
# Sourced, not run. The sourcing script sets LOG_TAG (its name in log lines) and T0=$SECONDS, and defines
# diagnostics() (what to print before dying).

log() { printf '[%s %3ds] %s\n' "$LOG_TAG" "$((SECONDS - T0))" "$*"; }
warn() { printf '[%s %3ds] WARNING: %s\n' "$LOG_TAG" "$((SECONDS - T0))" "$*" >&2; }

die() {
    printf '[%s %3ds] ERROR: %s\n' "$LOG_TAG" "$((SECONDS - T0))" "$*" >&2
    diagnostics
    exit 1
}

need_root() {
    [[ $(id -u) -eq 0 ]] || { echo "$LOG_TAG.sh must run as root (it starts munged/slurmctld/slurmd)" >&2; exit 1; }
}

# running PID: true if PID is a live process (not a zombie: PID 1 of a container
# may be slow to reap the intermediate processes of daemonising programs).
running() {
    local st
    st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ -n "$st" && "$st" != Z && "$st" != X ]]
}

# pid_alive NAME PIDFILE: true if PIDFILE names a live process whose comm is NAME.
pid_alive() {
    local name=$1 pidfile=$2 pid
    [[ -s "$pidfile" ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n "$pid" ]] && running "$pid" || return 1
    [[ "$(cat /proc/"$pid"/comm 2>/dev/null)" == "$name" ]]
}

# stop_pidfile NAME PIDFILE [WAIT_S]: TERM the process, KILL it after WAIT_S.
stop_pidfile() {
    local name=$1 pidfile=$2 wait_s=${3:-15} pid i
    if ! pid_alive "$name" "$pidfile"; then
        rm -f "$pidfile"
        return 0
    fi
    pid=$(tr -dc '0-9' <"$pidfile")
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < wait_s * 5; i++)); do
        running "$pid" || break
        sleep 0.2
    done
    if running "$pid"; then
        warn "$name (pid $pid) did not exit after ${wait_s}s, sending KILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$pidfile"
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.5 s.
wait_for() {
    local secs=$1 what=$2 i
    shift 2
    for ((i = 0; i < secs * 2; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    die "timed out after ${secs}s waiting for: $what"
}

file_hash() { sha256sum "$1" 2>/dev/null | cut -d' ' -f1; }

# conf_of PID: the configuration file a slurm daemon was started with (`-f FILE`), or of its parent for a fork
# that rewrote its command line (slurmctld's slurmscriptd); empty when neither names one.
conf_of() {
    local pid=$1 hop args i
    for hop in 1 2; do
        mapfile -d '' -t args <"/proc/$pid/cmdline" 2>/dev/null || return 0
        for ((i = 0; i + 1 < ${#args[@]}; i++)); do
            [[ "${args[i]}" == -f ]] && { printf '%s\n' "${args[i + 1]}"; return 0; }
        done
        pid=$(ps -o ppid= -p "$pid" 2>/dev/null | tr -d ' ')
        [[ -n "$pid" ]] || return 0
    done
}

# with_lock LOCKFILE COMMAND...: one invocation at a time (several pytest workers calling start at once). The
# lock is fd 9; every daemon is started with 9>&- so that it does not keep it.
with_lock() {
    local lock=$1
    shift
    need_root
    exec 9>"$lock"
    if ! flock -n 9; then
        log "waiting for another $LOG_TAG.sh (lock $lock)"
        flock -w 300 9 || die "could not lock $lock within 300s (holder: $(fuser "$lock" 2>/dev/null))"
    fi
    "$@"
}

# node_state NODE: its state in sinfo (idle, mixed, down*, ...), empty if sinfo does not answer.
node_state() { timeout 10 sinfo -h -N -n "$1" -o '%T' 2>/dev/null | head -1; }

# wait_node_up NODE: poll until the node is usable (resuming it, at most 3 times, while it is down or drained).
wait_node_up() {
    local node="$1" i st resumed=0
    for ((i = 0; i < 120; i++)); do
        st=$(node_state "$node" || true)
        case "$st" in
            idle | mixed | allocated | completing) log "node $node: $st"; return 0 ;;
            *'*') ;; # not responding yet (slurmd registering)
            down* | drain* | fail* | inval*)
                if ((resumed < 3)) && ((i % 10 == 0)); then
                    log "node $node is '$st' ($(timeout 5 sinfo -h -R -n "$node" -o '%E' | head -1)): resuming"
                    timeout 10 scontrol update nodename="$node" state=resume || true
                    resumed=$((resumed + 1))
                fi ;;
        esac
        sleep 0.5
    done
    die "node $node did not become idle (state: '${st:-unknown}')"
}

# cancel_jobs: scancel every job of the cluster the environment names, then wait up to 20 s for them to leave.
cancel_jobs() {
    local jobs i
    jobs=$(timeout 10 squeue -h -o '%A' 2>/dev/null | tr '\n' ' ' || true)
    [[ -n "${jobs// /}" ]] || return 0
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs || true
    for ((i = 0; i < 40; i++)); do
        [[ -z "$(timeout 5 squeue -h -o '%A' 2>/dev/null)" ]] && break
        sleep 0.5
    done
}
