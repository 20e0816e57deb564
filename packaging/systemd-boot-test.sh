#!/usr/bin/env bash
# The agent under a real systemd (PID 1 of private pid, mount, uts, ipc, net and cgroup
# namespaces, over an overlay of / with its own cgroup2 mount; nothing on the host changes).
# Installs a release tarball with the Batch start-task installer (packaging/batch/install.sh)
# on a fake Batch node and checks:
#   READY (Type=notify), socket activation (a `get` with the service stopped starts it), restart
#   after SIGKILL with the ingested key back, `systemctl reload`, journald fields and MESSAGE
#   text, the exposure score of the installed unit, and the start race (a task root created
#   after the service started is read-only in its sandbox; the agent must get itself restarted
#   and never log a removal that did not happen).
#
#   packaging/systemd-boot-test.sh [--bin-dir DIR] [--tarball FILE] [--threshold 1.5]
#
#   --bin-dir DIR  release binaries (nodeseal-agent, nodeseal-client, docker-credential-nodeseal
#                  and the seal CLI nodeseal); default target/release
#   --tarball F    install this tarball instead of packing one from --bin-dir
#   --deb F        also install this .deb with DEPLOYMENT.md's .deb start task command
# The install commands are read from packaging/DEPLOYMENT.md (the Pool JSON commandLine, the
# .deb commandLine, the blocks marked <!-- ci: NAME -->), so the recipes are what is tested.
# Exit status: 0 all checks passed; 1 a check failed; 2 usage; 77 systemd cannot boot here
# (prints "SKIPPED: <reason>"; with CI=true that is a failure, exit 1).
set -euo pipefail

prog=systemd-boot-test
repo="$(cd "$(dirname "$0")/.." && pwd)"
bin_dir="$repo/target/release"
tarball=""
deb=""
threshold=1.5
while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) bin_dir="${2:?--bin-dir needs a directory}"; shift 2 ;;
        --tarball) tarball="${2:?--tarball needs a file}"; shift 2 ;;
        --threshold) threshold="${2:?--threshold needs a number}"; shift 2 ;;
        --deb) deb="${2:?--deb needs a file}"; shift 2 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "$prog: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

# Absolute: the fixtures are made from other directories.
bin_dir="$(cd "$bin_dir" 2>/dev/null && pwd)" || { echo "$prog: --bin-dir: no such directory" >&2; exit 2; }

say() { echo "$prog: $*"; }
fail() { echo "$prog: FAILED: $*" >&2; exit 1; }
skip() {
    if [ "${CI:-}" = true ]; then
        fail "systemd cannot boot here and CI=true requires this test: $*"
    fi
    echo "$prog: SKIPPED: $*"
    exit 77
}

# --- can systemd boot here? -------------------------------------------------------------------
[ "$(id -u)" = 0 ] || skip "needs root (namespaces, overlayfs, cgroup2)"
[ -x /lib/systemd/systemd ] || skip "/lib/systemd/systemd is not installed (apt-get install systemd)"
command -v unshare >/dev/null && command -v nsenter >/dev/null || skip "unshare/nsenter missing (util-linux)"
grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || true
grep -qw overlay /proc/filesystems || skip "the kernel has no overlayfs"
if [ "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ]; then
    cg_parent=/sys/fs/cgroup
elif [ -f /sys/fs/cgroup/unified/cgroup.procs ]; then
    cg_parent=/sys/fs/cgroup/unified
else
    skip "no cgroup2 hierarchy (neither /sys/fs/cgroup nor /sys/fs/cgroup/unified is cgroup2)"
fi
for b in nodeseal-agent nodeseal-client nodeseal; do
    [ -x "$bin_dir/$b" ] || fail "$bin_dir/$b not found; cargo build --release --locked -p nodeseal-agent -p nodeseal-client -p nodeseal --bins"
done

# --- scratch: everything lives in a tmpfs and a child cgroup, removed on exit -----------------
base="$(mktemp -d /tmp/nodeseal-boot.XXXXXX)"
cg="$cg_parent/nodeseal-boot-$$"
init_pid=""
cleanup() {
    if [ -n "$init_pid" ] && kill -0 "$init_pid" 2>/dev/null; then
        kill -s RTMIN+4 "$init_pid" 2>/dev/null || true   # systemd: poweroff
        for _ in $(seq 50); do kill -0 "$init_pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$init_pid" 2>/dev/null || true
    fi
    [ -n "${unshare_pid:-}" ] && wait "$unshare_pid" 2>/dev/null || true
    if [ -d "$cg" ]; then
        find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
    fi
    umount -l "$base" 2>/dev/null || true
    rm -rf "$base"
}
trap cleanup EXIT
mount -t tmpfs -o mode=0700,size=1g tmpfs "$base"
mkdir -p "$base"/upper "$base"/work "$base"/root "$base"/upper/ci

# --- artifacts and a fake Batch node, written into the overlay's upper layer ------------------
if [ -z "$tarball" ]; then
    tarball="$("$repo/packaging/build-tarball.sh" --no-build --bin-dir "$bin_dir" --out-dir "$base/out" | tail -n 1)"
fi
cp "$tarball" "$base/upper/ci/"
tar_name="$(basename "$tarball")"
[ -z "$deb" ] || cp "$deb" "$base/upper/ci/"
cp "$repo/packaging/batch/install.sh" "$base/upper/ci/install.sh"
# The recipes as DEPLOYMENT.md has them (versions are the workspace version, as in the doc).
doc="$repo/packaging/DEPLOYMENT.md"
start_task="$(sed -n 's/^ *"commandLine": "\(.*tar -xzf.*\)",\{0,1\}$/\1/p' "$doc" | head -n 1)"
deb_task="$(sed -n 's/^ *"commandLine": "\(.*\.deb\)",\{0,1\}$/\1/p' "$doc" | head -n 1)"
[ -n "$start_task" ] || fail "no tarball start task commandLine in $doc"
[ -n "$deb_task" ] || fail "no .deb start task commandLine in $doc"
doc_block() { # NAME: the fenced block after <!-- ci: NAME --> in DEPLOYMENT.md
    awk -v m="<!-- ci: $1 -->" '$0 == m {on=1; next} on && /^```/ {if (inb) exit; inb=1; next} on && inb' "$doc"
}
for b in slurm-install slurm-job; do
    [ -n "$(doc_block "$b")" ] || fail "no <!-- ci: $b --> block in $doc"
    doc_block "$b" > "$base/upper/ci/$b.sh"
done
fix="$base/fix"
mkdir -p "$fix"
tp="$(cd "$fix" && "$bin_dir/nodeseal" cert create --prefix pool --bits 2048 | tail -n 1 | tr 'A-F' 'a-f')" \
    || fail "nodeseal cert create failed"
secret="boot-test-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
token="$(printf '%s' "$secret" | "$bin_dir/nodeseal" seal --cert "$fix/pool.crt" --name DB_PASSWORD)"
# The second key, dropped only after the start race set in.
tp_late="$(cd "$fix" && "$bin_dir/nodeseal" cert create --prefix late --bits 2048 | tail -n 1 | tr 'A-F' 'a-f')" \
    || fail "nodeseal cert create failed"
token_late="$(printf '%s' "$secret-late" | "$bin_dir/nodeseal" seal --cert "$fix/late.crt" --name LATE_PASSWORD)"
cp "$fix"/pool.pfx "$fix"/pool.pfx.pw "$fix"/late.pfx "$fix"/late.pfx.pw "$base/upper/ci/"
printf 'DB_PASSWORD=%s\n' "$token" > "$base/upper/ci/task.env"
printf 'LATE_PASSWORD=%s\n' "$token_late" > "$base/upper/ci/late.env"
# The task user: this machine's unprivileged test user, made inside the test system (only) where
# the host has none.
tester_uid="$(id -u tester 2>/dev/null || echo 4240)"

# Runs inside the booted system: a Batch node's root dir with one task owned by the test uid.
cat > "$base/upper/ci/make-node.sh" <<EOF
#!/bin/sh
# make-node.sh NODE_ROOT KEY ENVFILE  (KEY: pool or late)
set -eu
root=\$1
install -d -m 0755 "\$root" "\$root/startup" "\$root/startup/certs" "\$root/startup/wd" "\$root/workitems"
tp=\$([ "\$2" = pool ] && echo $tp || echo $tp_late)
install -m 0644 /ci/\$2.pfx "\$root/startup/certs/sha1-\$tp.pfx"
install -m 0644 /ci/\$2.pfx.pw "\$root/startup/certs/sha1-\$tp.pfx.pw"
install -d -m 0755 "\$root/workitems/job-\$2" "\$root/workitems/job-\$2/job-1"
install -d -m 0700 -o $tester_uid "\$root/workitems/job-\$2/job-1/task-1" "\$root/workitems/job-\$2/job-1/task-1/wd"
install -m 0600 -o $tester_uid /ci/\$3 "\$root/workitems/job-\$2/job-1/task-1/wd/.shipyard.envlist"
EOF
chmod 0755 "$base/upper/ci/make-node.sh"
mkdir -p "$base/upper/etc/systemd/system"
# Units of this machine that have no business in the test system.
for u in postgresql.service getty@.service systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer \
         man-db.timer e2scrub_all.timer fstrim.timer dpkg-db-backup.timer; do
    ln -sf /dev/null "$base/upper/etc/systemd/system/$u"
done

# --- boot -------------------------------------------------------------------------------------
t0=$SECONDS
mkdir "$cg"
# The child enters the cgroup before unsharing, so the new cgroup namespace is rooted there.
(
    echo "$BASHPID" > "$cg/cgroup.procs"
    exec unshare --pid --mount --uts --ipc --net --cgroup --fork --propagation private \
        /bin/sh -c '
set -e
b=$1; r=$b/root
mount -t overlay overlay -o "lowerdir=/,upperdir=$b/upper,workdir=$b/work" "$r"
mount -t proc proc "$r/proc"
mount -t sysfs -o ro sysfs "$r/sys"
mount -t cgroup2 cgroup2 "$r/sys/fs/cgroup"
mount --rbind /dev "$r/dev"
mount -t tmpfs -o mode=1777 tmpfs "$r/tmp"
hostname nodeseal-boot-test
mkdir -p "$r/.oldroot"
cd "$r"
pivot_root . .oldroot
umount -l /.oldroot
export container=other
exec /lib/systemd/systemd --system --log-target=journal-or-kmsg </dev/null >/dev/null 2>&1
' sh "$base"
) &
unshare_pid=$!
for _ in $(seq 100); do
    init_pid="$(cat "$cg/init.scope/cgroup.procs" 2>/dev/null | head -n 1 || true)"
    [ -z "$init_pid" ] || break
    kill -0 "$unshare_pid" 2>/dev/null || skip "unshare/systemd exited at once (namespaces or overlayfs refused)"
    sleep 0.1
done
[ -n "$init_pid" ] || skip "systemd did not start as PID 1 within 10s"
in_sys() { nsenter -t "$init_pid" -a "$@"; }
for _ in $(seq 300); do in_sys test -S /run/systemd/private 2>/dev/null && break; sleep 0.1; done
state="$(in_sys timeout 60 systemctl is-system-running --wait 2>&1 || true)"
case "$state" in
    running) ;;
    degraded) say "system degraded (failed units: $(in_sys systemctl list-units --failed --plain --no-legend --no-pager | awk '{print $1}' | tr '\n' ' '))" ;;
    *) skip "systemd did not finish booting (state: ${state:-none})" ;;
esac
say "booted systemd $(in_sys systemctl --version | head -n 1 | cut -d' ' -f2) as PID 1 in $((SECONDS - t0))s ($state)"

in_sys id -u tester >/dev/null 2>&1 || in_sys useradd --no-create-home --uid "$tester_uid" tester \
    || fail "cannot create the task user inside the test system"
pass() { say "ok: $*"; }
prop() { in_sys systemctl show -p "$1" --value nodeseal-agent.service; }
get_as_task() { # NAME JOB [socket]
    in_sys runuser -u tester -- env AZ_BATCH_TASK_DIR="/mnt/batch/tasks/workitems/$2/job-1/task-1" \
        nodeseal-client get -n ${3:+--socket "$3"} "$1"
}
wait_for() { # seconds description command...
    local n=$(( $1 * 10 )) what=$2; shift 2
    for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    fail "$what (waited $(( n / 10 ))s)"
}
journal() { in_sys journalctl -u nodeseal-agent.service --no-pager "$@"; }

# --- install as a Batch start task ------------------------------------------------------------
in_sys /ci/make-node.sh /mnt/batch/tasks pool task.env
# As Batch runs a start task: resource files in its wd, the command line from the pool JSON.
in_sys cp "/ci/$tar_name" /mnt/batch/tasks/startup/wd/
in_sys env AZ_BATCH_NODE_ROOT_DIR=/mnt/batch/tasks AZ_BATCH_NODE_STARTUP_DIR=/mnt/batch/tasks/startup \
    sh -c "cd /mnt/batch/tasks/startup/wd && $start_task" \
    || { journal -n 40 >&2 || true; fail "the start task ($start_task) failed"; }
pass "start task '$start_task' installed and started the agent"

# READY: Type=notify, so active means READY=1 was sent.
[ "$(prop ActiveState)" = active ] || fail "nodeseal-agent.service is $(prop ActiveState), not active"
# journald may lag behind the service by a moment.
wait_for 10 "no 'nodeseal-agent ready' in the journal" \
    sh -c "nsenter -t $init_pid -a journalctl -u nodeseal-agent.service -o json --no-pager | grep -q '\"MESSAGE\":\"nodeseal-agent ready\"'"
pass "READY (Type=notify, service active)"

wait_for 20 "the PFX original was not removed after ingest" \
    nsenter -t "$init_pid" -a test ! -e "/mnt/batch/tasks/startup/certs/sha1-$tp.pfx"
in_sys test -e "/var/lib/nodeseal/keys/sha1-$tp.pfx" || fail "the key was not ingested into /var/lib/nodeseal/keys"
in_sys test ! -e "/mnt/batch/tasks/startup/certs/sha1-$tp.pfx" || fail "the ingested original is still in the certs dir"
got="$(get_as_task DB_PASSWORD job-pool /run/nodeseal/agent.sock)" || fail "get DB_PASSWORD as the task user failed"
[ "$got" = "$secret" ] || fail "get DB_PASSWORD returned the wrong value"
pass "key ingested (original removed), task user reads its value"

# --- socket activation ----------------------------------------------------------------------
in_sys systemctl stop nodeseal-agent.service
[ "$(prop ActiveState)" = inactive ] || fail "the service did not stop"
got="$(get_as_task DB_PASSWORD job-pool /run/nodeseal/agent.sock)" || fail "get with the service stopped failed"
[ "$got" = "$secret" ] || fail "get after socket activation returned the wrong value"
[ "$(prop ActiveState)" = active ] || fail "the get did not start the service"
pass "socket activation: a get with the service stopped started it and was answered"

# --- SIGKILL: systemd restarts it, the ingested key is back -----------------------------------
restarts="$(prop NRestarts)"
pid_before="$(prop MainPID)"
in_sys systemctl kill -s KILL nodeseal-agent.service
wait_for 30 "the agent was not restarted after SIGKILL" \
    sh -c "[ \"\$(nsenter -t $init_pid -a systemctl show -p NRestarts --value nodeseal-agent.service)\" -gt $restarts ] && nsenter -t $init_pid -a systemctl is-active --quiet nodeseal-agent.service"
[ "$(prop MainPID)" != "$pid_before" ] || fail "MainPID did not change after SIGKILL"
got="$(get_as_task DB_PASSWORD job-pool)" || fail "get after the restart failed"
[ "$got" = "$secret" ] || fail "get after the restart returned the wrong value"
pass "SIGKILL: restarted by systemd (NRestarts $restarts -> $(prop NRestarts)), ingested key served again"

# --- reload -------------------------------------------------------------------------------------
pid_before="$(prop MainPID)"
since="$(in_sys date '+%Y-%m-%d %H:%M:%S')"
in_sys systemctl reload nodeseal-agent.service || fail "systemctl reload failed"
wait_for 20 "no reload in the journal after systemctl reload" \
    sh -c "nsenter -t $init_pid -a journalctl -u nodeseal-agent.service --since '$since' -o cat --no-pager | grep -qi reload"
[ "$(prop MainPID)" = "$pid_before" ] || fail "systemctl reload restarted the agent instead of reloading it"
[ "$(prop ActiveState)" = active ] || fail "the agent is not active after reload"
pass "systemctl reload: SIGHUP handled in place (same MainPID)"

# --- journald fields ----------------------------------------------------------------------------
wait_for 10 "no journal entry for the last get" \
    sh -c "nsenter -t $init_pid -a journalctl -u nodeseal-agent.service -o json --no-pager | grep -q '\"OP\":\"get\"'"
entry="$(journal -o json --output-fields=MESSAGE,OUTCOME,PEER_UID,SECRET_NAME,TASK_ID,JOB_ID,KEY_ID,OP \
    | grep '"SECRET_NAME":"DB_PASSWORD"' | grep '"OP":"get"' | tail -n 1)"
[ -n "$entry" ] || fail "no journal entry with SECRET_NAME=DB_PASSWORD and OP=get"
for field in "\"OUTCOME\":\"ok\"" "\"PEER_UID\":\"$tester_uid\"" "\"JOB_ID\":\"job-pool\"" "\"KEY_ID\":\"$tp\""; do
    printf '%s' "$entry" | grep -qF "$field" || fail "journal entry lacks $field: $entry"
done
message="$(printf '%s' "$entry" | sed -n 's/.*"MESSAGE":"\([^"]*\)".*/\1/p')"
for word in get DB_PASSWORD "$tester_uid" ok; do
    printf '%s' "$message" | grep -qF -- "$word" || fail "MESSAGE does not say '$word': '$message'"
done
journal -o cat | grep -qF "$secret" && fail "the secret value is in the journal"
pass "journald: structured fields (OUTCOME, PEER_UID, JOB_ID, KEY_ID, SECRET_NAME) and MESSAGE '$message'"

# --- exposure score of the installed, running unit ---------------------------------------------
report="$(in_sys systemd-analyze security --no-pager nodeseal-agent.service 2>&1 || true)"
score="$(printf '%s\n' "$report" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')"
[ -n "$score" ] || { printf '%s\n' "$report" >&2; fail "no exposure score from systemd-analyze security"; }
awk -v s="$score" -v t="$threshold" 'BEGIN { exit !(s <= t) }' \
    || fail "exposure $score of the installed nodeseal-agent.service is above $threshold"
pass "exposure score $score (threshold $threshold)"

# --- the start race -----------------------------------------------------------------------------
# A node whose task root appears after the service started (custom image, wiped resource disk).
in_sys systemctl stop nodeseal-agent.service
in_sys rm -rf /mnt/batch
in_sys systemctl start nodeseal-agent.service
[ "$(prop ActiveState)" = active ] || fail "the agent did not start without its task root"
restarts="$(prop NRestarts)"
since="$(in_sys date '+%Y-%m-%d %H:%M:%S')"
in_sys /ci/make-node.sh /mnt/batch/tasks late late.env
wait_for 60 "the agent did not get itself restarted after its task root appeared read-only" \
    sh -c "[ \"\$(nsenter -t $init_pid -a systemctl show -p NRestarts --value nodeseal-agent.service)\" -gt $restarts ] && nsenter -t $init_pid -a systemctl is-active --quiet nodeseal-agent.service"
wait_for 30 "the late key's original was not removed after the restart" \
    nsenter -t "$init_pid" -a test ! -e "/mnt/batch/tasks/startup/certs/sha1-$tp_late.pfx"
wait_for 30 "no per-task socket in the late task after the restart" \
    nsenter -t "$init_pid" -a test -S /mnt/batch/tasks/workitems/job-late/job-1/task-1/nodeseal.sock
got="$(get_as_task LATE_PASSWORD job-late)" || fail "get LATE_PASSWORD after the start race failed"
[ "$got" = "$secret-late" ] || fail "get LATE_PASSWORD returned the wrong value"
# Never a claim that did not happen: every "original removed" line is about a file now gone.
journal --since "$since" -o json --output-fields=MESSAGE,FROM | grep 'readable original removed' \
    | sed -n 's/.*"FROM":"\([^"]*\)".*/\1/p' | while read -r from; do
        in_sys test ! -e "$from" || fail "the journal says $from was removed but it is still there"
    done
wait_for 10 "the journal does not say why the agent restarted" \
    sh -c "nsenter -t $init_pid -a journalctl -u nodeseal-agent.service --since '$since' -o cat --no-pager | grep -q 'appeared after the agent started and is read-only'"
pass "start race: root created after start -> agent restarted itself (NRestarts $restarts -> $(prop NRestarts)), key ingested, task socket bound"

# --- the .deb start task ------------------------------------------------------------------------
if [ -n "$deb" ]; then
    in_sys cp /ci/install.sh "/ci/$(basename "$deb")" /mnt/batch/tasks/startup/wd/
    in_sys env AZ_BATCH_NODE_ROOT_DIR=/mnt/batch/tasks AZ_BATCH_NODE_STARTUP_DIR=/mnt/batch/tasks/startup \
        sh -c "cd /mnt/batch/tasks/startup/wd && $deb_task" \
        || { journal -n 40 >&2 || true; fail "the .deb start task ($deb_task) failed"; }
    in_sys dpkg-query -W -f '${Status}' nodeseal-agent | grep -q 'install ok installed' || fail "dpkg does not list nodeseal-agent as installed"
    got="$(get_as_task LATE_PASSWORD job-late)" || fail "get after the .deb install failed"
    [ "$got" = "$secret-late" ] || fail "get after the .deb install returned the wrong value"
    pass ".deb start task '$deb_task': installed through dpkg, agent serves"
else
    say "not tested: the .deb start task (no --deb given)"
fi

# --- Slurm: install --layout flat, prolog, a job, epilog ------------------------------------------
in_sys sh -c "cd /root && cp /ci/$tar_name . && sh -eux /ci/slurm-install.sh" \
    || { journal -n 40 >&2 || true; fail "DEPLOYMENT.md's Slurm install block failed"; }
in_sys grep -q '"task_layout": "flat"' /etc/nodeseal/agent.json || fail "the Slurm install did not write a flat config"
in_sys env SLURM_JOB_ID=42 SLURM_JOB_UID="$tester_uid" /etc/slurm/prolog.d/nodeseal.sh || fail "the Slurm prolog failed"
job_env="$(in_sys env SLURM_JOB_ID=42 runuser -u tester -- /etc/slurm/task_prolog.sh)" || fail "the task prolog failed"
in_sys runuser -u tester -- env SLURM_JOB_ID=42 TOKEN="$token" sh -c "$(printf '%s\n' "$job_env" | sed -n 's/^export /export /p')
mkdir -p /tmp/job && cd /tmp/job && printf 'DB_PASSWORD=%s\n' \"\$TOKEN\" > job.sealed.env
for i in \$(seq 100); do sh -e /ci/slurm-job.sh > /tmp/slurm-job.out 2>/tmp/slurm-job.err && exit 0; sleep 0.1; done
cat /tmp/slurm-job.err >&2; exit 1" || fail "the Slurm job block failed"
got="$(in_sys cat /tmp/slurm-job.out)"
[ "$got" = "$secret" ] || fail "the Slurm job read the wrong value"
in_sys env SLURM_JOB_ID=42 /etc/slurm/epilog.d/nodeseal.sh || fail "the Slurm epilog failed"
in_sys test ! -e /var/spool/nodeseal/jobs/42 || fail "the epilog left the job dir"
pass "Slurm: install --layout flat, prolog made the job dir, the job read its value, epilog removed it"

say "all checks passed in $((SECONDS - t0))s"
