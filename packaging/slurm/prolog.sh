#!/bin/sh
# Slurm Prolog for nodeseal (runs as root on the compute node before each job; install as
# /etc/slurm/prolog.d/nodeseal.sh with Prolog=/etc/slurm/prolog.d/* in slurm.conf).
# 1. Keeps jobs off a node whose agent is down: a non-zero exit drains the node with this
#    reason instead of running the job without its secrets.
# 2. Makes the job's task dir <env root>/<job id>, owned by the job's user, mode 0700: the job
#    writes its sealed env file there (nodeseal.env) and the agent serves it to that uid only.
# Env root: NODESEAL_ENV_ROOT, default /var/spool/nodeseal/jobs (install.sh --layout flat).
set -eu
root="${NODESEAL_ENV_ROOT:-/var/spool/nodeseal/jobs}"
case "${SLURM_JOB_ID:-}" in ''|*[!0-9]*) echo "nodeseal prolog: SLURM_JOB_ID is not a job number: '${SLURM_JOB_ID:-}'" >&2; exit 1 ;; esac
case "${SLURM_JOB_UID:-}" in ''|*[!0-9]*) echo "nodeseal prolog: SLURM_JOB_UID is not a uid: '${SLURM_JOB_UID:-}'" >&2; exit 1 ;; esac
if ! systemctl is-active --quiet nodeseal-agent.service; then
    systemctl start nodeseal-agent.service || true
    if ! systemctl is-active --quiet nodeseal-agent.service; then
        echo "nodeseal-agent is not running on $(hostname)" >&2
        exit 1
    fi
fi
# A leftover from an earlier job with the same id (after a slurmctld reset) is not reused.
dir="$root/$SLURM_JOB_ID"
rm -rf --one-file-system "$dir"
install -d -m 0700 -o "$SLURM_JOB_UID" -g "${SLURM_JOB_GID:-$SLURM_JOB_UID}" "$dir"
exit 0
