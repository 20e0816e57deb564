#!/bin/sh
# Slurm Epilog for nodeseal (root, after each job; /etc/slurm/epilog.d/nodeseal.sh with
# Epilog=/etc/slurm/epilog.d/*): removes the job's task dir, so its sealed values are no longer
# served (the agent drops a task when its env file goes).
set -eu
root="${NODESEAL_ENV_ROOT:-/var/spool/nodeseal/jobs}"
case "${SLURM_JOB_ID:-}" in ''|*[!0-9]*) echo "nodeseal epilog: SLURM_JOB_ID is not a job number: '${SLURM_JOB_ID:-}'" >&2; exit 1 ;; esac
# rm does not follow symlinks the job planted; --one-file-system keeps it off any mount.
rm -rf --one-file-system "$root/$SLURM_JOB_ID"
exit 0
