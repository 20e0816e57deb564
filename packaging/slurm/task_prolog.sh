#!/bin/sh
# Slurm TaskProlog for nodeseal (TaskProlog=/etc/slurm/task_prolog.sh in slurm.conf; runs as the
# job's user; each "export" line on stdout lands in the task's environment). nodeseal-client
# reads AZ_BATCH_TASK_DIR as "my task dir": --task defaults to it and the per-task socket in it
# is used when it exists.
root="${NODESEAL_ENV_ROOT:-/var/spool/nodeseal/jobs}"
echo "export AZ_BATCH_TASK_DIR=$root/$SLURM_JOB_ID"
