#!/usr/bin/env bash
# Installs nodeseal-agent on an Azure Batch node. Meant as (part of) the pool's start task,
# run elevated (autoUser, scope pool, elevationLevel admin). Safe to run again: every reboot or
# reimage reruns the start task.
#
#   install.sh [--layout batch|flat] [--env-root DIR] [ARTIFACT]
#
#   --layout batch   (default) an Azure Batch node: paths from AZ_BATCH_NODE_ROOT_DIR and
#                    AZ_BATCH_NODE_STARTUP_DIR, tasks in the Batch layout
#   --layout flat    any other host (Slurm, plain servers): no AZ_BATCH_* needed; tasks are
#                    <env root>/<id>/ with env files in them (task_layout "flat"), keys from
#                    /etc/nodeseal/keys (and the Key Vault extension / waagent stores)
#   --env-root DIR   the flat layout's env root (default /var/spool/nodeseal/jobs); created
#                    root-owned 0755 and made writable for the sandboxed service (also under
#                    /home: the drop-in then sets ProtectHome=read-only instead of yes)
#
# ARTIFACT is a release tarball (nodeseal-<version>-linux-x86_64.tar.gz), a Debian package
# (nodeseal-agent_<version>_amd64.deb) or an unpacked tarball directory. Without it: the
# directory this script is in when that is an unpacked tarball, else the highest-versioned tarball or .deb
# found next to this script, in $AZ_BATCH_NODE_STARTUP_DIR/wd (where start task resource files
# land) or in the current directory.
#
# Environment:
#   AZ_BATCH_NODE_ROOT_DIR     required with --layout batch; task trees are under <it>/workitems
#   AZ_BATCH_NODE_STARTUP_DIR  required with --layout batch; the pool's certificates are in <it>/certs
#   DESTDIR                    lay the files down under this root only: no dpkg, no systemctl,
#                              root not required (image building, tests)
#   NODESEAL_INSTALL_NO_SYSTEMD=1  lay the files down but do not touch systemd
#   NODESEAL_READY_TIMEOUT     seconds to wait for the agent to become ready (default 60)
#   AZ_BATCH_POOL_ID           optional; becomes the config's pool_id (what pool: audience
#                              selectors match)
#
# /etc/nodeseal/agent.json is written from the node's AZ_BATCH_* paths (or the flat env root) when it does not exist,
# when it is the packaged default, or when it is unchanged since this script last wrote it
# (recorded in /etc/nodeseal/.agent.json.installer-sha256). An edited config is left alone.
#
# Exit status: 0 installed (and, with systemd, the agent answers); 1 failure, reason on stderr.
set -euo pipefail

prog="nodeseal install.sh"
die() { echo "$prog: error: $*" >&2; exit 1; }
say() { echo "$prog: $*"; }

layout=batch
flat_root=/var/spool/nodeseal/jobs
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
        --layout) layout="${2:-}"; shift 2 || die "--layout needs a value: batch or flat" ;;
        --layout=*) layout="${1#--layout=}"; shift ;;
        --env-root) flat_root="${2:-}"; shift 2 || die "--env-root needs a directory" ;;
        --env-root=*) flat_root="${1#--env-root=}"; shift ;;
        --) shift; args+=("$@"); break ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) args+=("$1"); shift ;;
    esac
done
set -- ${args[@]+"${args[@]}"}
[ $# -le 1 ] || die "expected at most one argument (the tarball, .deb or unpacked directory), got $#"
case "$layout" in batch|flat) ;; *) die "--layout must be batch or flat, got '$layout'" ;; esac

# --- environment -----------------------------------------------------------------------------
destdir="${DESTDIR:-}"
destdir="${destdir%/}"
[ -z "$destdir" ] || case "$destdir" in /*) ;; *) die "DESTDIR must be an absolute path, got '$destdir'" ;; esac

# Paths end up inside JSON strings and sed replacements; refuse anything that would need
# escaping rather than escape it subtly wrong.
check_path() { # name value
    [ -n "$2" ] || die "$1 is not set; run this as an Azure Batch start task, or export $1 (e.g. $1=$3)"
    case "$2" in /*) ;; *) die "$1 must be an absolute path, got '$2'" ;; esac
    case "$2" in *[!A-Za-z0-9._/@+=:,-]*) die "$1 contains characters this installer does not handle: '$2'" ;; esac
}
if [ "$layout" = batch ]; then
    check_path AZ_BATCH_NODE_ROOT_DIR "${AZ_BATCH_NODE_ROOT_DIR:-}" /mnt/batch/tasks
    check_path AZ_BATCH_NODE_STARTUP_DIR "${AZ_BATCH_NODE_STARTUP_DIR:-}" /mnt/batch/tasks/startup
    node_root="${AZ_BATCH_NODE_ROOT_DIR%/}"
    startup_dir="${AZ_BATCH_NODE_STARTUP_DIR%/}"
else
    check_path --env-root "$flat_root" /var/spool/nodeseal/jobs
    flat_root="${flat_root%/}"
    node_root="" startup_dir=""
fi

pool_id="${AZ_BATCH_POOL_ID:-}"
case "$pool_id" in *[!A-Za-z0-9_-]*) die "AZ_BATCH_POOL_ID is not a Batch pool id (letters, digits, '-', '_'): '$pool_id'" ;; esac
[ "${#pool_id}" -le 64 ] || die "AZ_BATCH_POOL_ID is longer than a Batch pool id (64): '$pool_id'"

ready_timeout="${NODESEAL_READY_TIMEOUT:-60}"
case "$ready_timeout" in ''|*[!0-9]*) die "NODESEAL_READY_TIMEOUT must be a whole number of seconds, got '$ready_timeout'" ;; esac

use_systemd=1
if [ -n "$destdir" ]; then
    use_systemd=0; systemd_skip_reason="DESTDIR is set"
elif [ "${NODESEAL_INSTALL_NO_SYSTEMD:-}" = 1 ]; then
    use_systemd=0; systemd_skip_reason="NODESEAL_INSTALL_NO_SYSTEMD=1"
fi

if [ -z "$destdir" ] && [ "$(id -u)" != 0 ]; then
    die "must run as root (Batch start task: userIdentity autoUser scope pool, elevationLevel admin), or set DESTDIR to stage the files"
fi
if [ "$use_systemd" = 1 ] && [ ! -d /run/systemd/system ]; then
    die "systemd is not running on this machine (no /run/systemd/system); set NODESEAL_INSTALL_NO_SYSTEMD=1 to only install the files"
fi

# --- find the artifact -----------------------------------------------------------------------
script_dir="$(cd "$(dirname "$0")" && pwd)"
artifact="${1:-}"
if [ -z "$artifact" ]; then
    if [ -x "$script_dir/bin/nodeseal-agent" ]; then
        artifact="$script_dir"
    else
        for dir in "$script_dir" ${startup_dir:+"$startup_dir/wd"} "$PWD"; do
            [ -d "$dir" ] || continue
            artifact="$(find "$dir" -maxdepth 1 -type f \
                \( -name 'nodeseal-[0-9]*-linux-x86_64.tar.gz' -o -name 'nodeseal-agent_*.deb' \) \
                -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)"
            if [ -n "$artifact" ]; then artifact="$dir/$artifact"; break; fi
        done
        [ -n "$artifact" ] || die "no nodeseal artifact found: looked for nodeseal-<version>-linux-x86_64.tar.gz or nodeseal-agent_*.deb in $script_dir, ${startup_dir:+$startup_dir/wd, }$PWD; add it as a start task resource file or pass its path"
    fi
fi
[ -e "$artifact" ] || die "artifact '$artifact' does not exist"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# A .deb in DESTDIR mode is unpacked like a tarball; without DESTDIR it goes through dpkg so
# the package database knows the files.
pkg_mode=files
case "$artifact" in
    *.deb)
        command -v dpkg-deb >/dev/null 2>&1 || die "$artifact is a Debian package but dpkg-deb is not installed; use the tarball"
        if [ -n "$destdir" ]; then
            dpkg-deb -x "$artifact" "$work/deb" || die "cannot unpack $artifact"
        else
            pkg_mode=deb
        fi
        ;;
    *.tar.gz|*.tgz)
        mkdir "$work/tar"
        tar -xzf "$artifact" -C "$work/tar" || die "cannot unpack $artifact (corrupt download?)"
        src="$(find "$work/tar" -mindepth 2 -maxdepth 3 -type f -path '*/bin/nodeseal-agent' -printf '%h\n' | head -n 1)"
        [ -n "$src" ] || die "$artifact does not contain bin/nodeseal-agent; is it a nodeseal release tarball?"
        src="${src%/bin}"
        ;;
    *)
        [ -d "$artifact" ] || die "don't know how to install '$artifact': expected a .tar.gz, a .deb or an unpacked tarball directory"
        src="$(cd "$artifact" && pwd)"
        ;;
esac

# --- lay down the files ----------------------------------------------------------------------
changed=0   # whether a running agent must be restarted to pick up new files
put() { # mode source target
    local target="$destdir$3"
    if [ -f "$target" ] && cmp -s "$2" "$target" && [ "$(stat -c %a "$target")" = "${1#0}" ]; then
        return 0
    fi
    install -D -m "$1" "$2" "$target" || die "cannot install $3"
    changed=1
}
# Man pages and completions: installed like the rest, but a change to them is no reason to
# restart the agent.
put_doc() { # source target
    local was="$changed"
    put 0644 "$1" "$2"
    changed="$was"
}
# Tarballs and packages older than the generated docs have none; that is not an error.
put_docs() { # root-with-man-and-completions-dirs: man/man1 man/man8 completions/{bash,zsh,fish}
    local f f_dir
    for f in "$1"/man/man1/*.1.gz "$1"/man/man8/*.8.gz; do
        [ -f "$f" ] || continue
        f_dir="$(basename "$(dirname "$f")")"
        put_doc "$f" "/usr/share/man/$f_dir/$(basename "$f")"
    done
    for f in "$1"/completions/bash/*; do
        [ -f "$f" ] && put_doc "$f" "/usr/share/bash-completion/completions/$(basename "$f")"
    done
    for f in "$1"/completions/zsh/*; do
        [ -f "$f" ] && put_doc "$f" "/usr/share/zsh/vendor-completions/$(basename "$f")"
    done
    for f in "$1"/completions/fish/*; do
        [ -f "$f" ] && put_doc "$f" "/usr/share/fish/vendor_completions.d/$(basename "$f")"
    done
    return 0
}
mkdir_mode() { # mode dir
    install -d -m "$1" "$destdir$2" || die "cannot create $2"
    chmod "$1" "$destdir$2"
}

mkdir_mode 0755 /etc/nodeseal
mkdir_mode 0700 /var/lib/nodeseal
mkdir_mode 0700 /var/lib/nodeseal/keys
template=/usr/share/nodeseal/agent.json.default

if [ "$pkg_mode" = deb ]; then
    command -v dpkg >/dev/null 2>&1 || die "dpkg is not installed; use the tarball"
    before="$(dpkg-query -W -f '${Version}' nodeseal-agent 2>/dev/null || true)"
    # confold: an operator-edited /etc/nodeseal/agent.json survives upgrades without a prompt.
    dpkg --force-confold -i "$artifact" || die "dpkg -i $artifact failed (see dpkg's messages above)"
    after="$(dpkg-query -W -f '${Version}' nodeseal-agent 2>/dev/null || true)"
    [ "$before" = "$after" ] || say "package nodeseal-agent ${before:-not installed} -> $after"
else
    if [ -d "$work/deb" ]; then
        # Unpacked .deb: same layout as a tarball, different places.
        for b in "$work"/deb/usr/bin/*; do put 0755 "$b" "/usr/bin/$(basename "$b")"; done
        for u in nodeseal-agent.service nodeseal-agent.socket; do
            f="$work/deb/lib/systemd/system/$u"; [ -f "$f" ] || f="$work/deb/usr/lib/systemd/system/$u"
            put 0644 "$f" "/lib/systemd/system/$u"
        done
        put 0644 "$work/deb/usr/lib/tmpfiles.d/nodeseal.conf" /usr/lib/tmpfiles.d/nodeseal.conf
        put 0644 "$work/deb$template" "$template"
        # Rearranged into the tarball's layout for put_docs.
        mkdir -p "$work/debdocs/completions"
        [ ! -d "$work/deb/usr/share/man" ] || cp -R "$work/deb/usr/share/man" "$work/debdocs/man"
        d="$work/deb/usr/share/bash-completion/completions"; [ ! -d "$d" ] || cp -R "$d" "$work/debdocs/completions/bash"
        d="$work/deb/usr/share/zsh/vendor-completions"; [ ! -d "$d" ] || cp -R "$d" "$work/debdocs/completions/zsh"
        d="$work/deb/usr/share/fish/vendor_completions.d"; [ ! -d "$d" ] || cp -R "$d" "$work/debdocs/completions/fish"
        put_docs "$work/debdocs"
    else
        [ -x "$src/bin/nodeseal-agent" ] || die "$src/bin/nodeseal-agent is missing or not executable"
        for b in "$src"/bin/*; do put 0755 "$b" "/usr/bin/$(basename "$b")"; done
        for f in systemd/nodeseal-agent.service systemd/nodeseal-agent.socket systemd/nodeseal.tmpfiles.conf agent.json; do
            [ -f "$src/$f" ] || die "$src/$f is missing; the tarball is incomplete"
        done
        put 0644 "$src/systemd/nodeseal-agent.service" /lib/systemd/system/nodeseal-agent.service
        put 0644 "$src/systemd/nodeseal-agent.socket" /lib/systemd/system/nodeseal-agent.socket
        put 0644 "$src/systemd/nodeseal.tmpfiles.conf" /usr/lib/tmpfiles.d/nodeseal.conf
        put 0644 "$src/agent.json" "$template"
        put_docs "$src"
    fi
fi
[ -f "$destdir$template" ] || die "$template was not installed; the artifact is incomplete"

# The unit can only list the usual Batch roots; a node with another root gets it here.
dropin_dir=/etc/systemd/system/nodeseal-agent.service.d
if [ "$layout" = batch ]; then
    dropin_src="$work/10-batch-root.conf"
    printf '# Written by nodeseal install.sh from AZ_BATCH_NODE_ROOT_DIR; rewritten on every run.\n[Service]\nReadWritePaths=-%s\n' \
        "$node_root" > "$dropin_src"
    put 0644 "$dropin_src" "$dropin_dir/10-batch-root.conf"
    stale="$dropin_dir/10-env-root.conf"
else
    # Created now, so it exists when the service starts: a ReadWritePaths= path that appears
    # later would be read-only in the service's sandbox (the agent then restarts itself).
    mkdir_mode 0755 "$flat_root"
    dropin_src="$work/10-env-root.conf"
    {
        printf '# Written by nodeseal install.sh --layout flat; rewritten on every run.\n[Service]\nReadWritePaths=%s\n' "$flat_root"
        case "$flat_root/" in
            /home/*|/root/*|/run/user/*)
                # ProtectHome=yes hides the whole tree, ReadWritePaths= included.
                printf 'ProtectHome=read-only\n' ;;
        esac
    } > "$dropin_src"
    put 0644 "$dropin_src" "$dropin_dir/10-env-root.conf"
    stale="$dropin_dir/10-batch-root.conf"
fi
if [ -e "$destdir$stale" ]; then
    rm -f "$destdir$stale" || die "cannot remove $stale (left from the other layout)"
    changed=1
fi

# --- the config ------------------------------------------------------------------------------
config="$destdir/etc/nodeseal/agent.json"
marker="$destdir/etc/nodeseal/.agent.json.installer-sha256"
wanted="$work/agent.json"
if [ "$layout" = batch ]; then
    sed -e "s|\"/mnt/batch/tasks/startup/certs\"|\"$startup_dir/certs\"|" \
        -e "s|\"env_roots\": \[\"/mnt/batch/tasks/workitems\"\]|\"env_roots\": [\"$node_root/workitems\"]|" \
        ${pool_id:+-e "s|\"pool_id\": null|\"pool_id\": \"$pool_id\"|"} \
        "$destdir$template" > "$wanted"
    if ! { grep -qF "\"$startup_dir/certs\"" "$wanted" && grep -qF "\"env_roots\": [\"$node_root/workitems\"]" "$wanted"; }; then
        die "$template does not have the expected default batch_certs path and env_roots; cannot derive the node config from it"
    fi
    config_says="certs $startup_dir/certs, tasks $node_root/workitems"
else
    # No Batch certificate drop on other hosts; tasks are <root>/<id>/.
    sed -e '/"kind": "batch_certs"/d' \
        -e "s|\"env_roots\": \[\"/mnt/batch/tasks/workitems\"\]|\"env_roots\": [\"$flat_root\"]|" \
        -e 's|"task_layout": "batch"|"task_layout": "flat"|' \
        "$destdir$template" > "$wanted"
    if grep -qF '"batch_certs"' "$wanted" || ! { grep -qF "\"env_roots\": [\"$flat_root\"]" "$wanted" && grep -qF '"task_layout": "flat"' "$wanted"; }; then
        die "$template does not have the expected default key sources, env_roots and task_layout; cannot derive the flat config from it"
    fi
    config_says="layout flat, tasks $flat_root/<id>, keys /etc/nodeseal/keys"
fi

sha() { sha256sum "$1" | cut -d' ' -f1; }
if [ ! -e "$config" ]; then
    write_config="it did not exist"
elif cmp -s "$config" "$wanted"; then
    write_config=""
    say "$config is up to date"
elif cmp -s "$config" "$destdir$template"; then
    write_config="it was the packaged default"
elif [ -f "$marker" ] && [ "$(sha "$config")" = "$(cat "$marker")" ]; then
    write_config="it was written by an earlier run of this installer"
else
    write_config=""
    say "leaving $config alone: it was edited after installation (compare with $template)"
fi
if [ -n "$write_config" ]; then
    if ! { install -m 0644 "$wanted" "$config.tmp" && mv -f "$config.tmp" "$config"; }; then
        die "cannot write $config"
    fi
    say "wrote $config ($write_config): $config_says"
    changed=1
fi
if cmp -s "$config" "$wanted"; then
    sha "$config" > "$marker.tmp" && mv -f "$marker.tmp" "$marker"
fi

# --- systemd ---------------------------------------------------------------------------------
if [ "$use_systemd" = 0 ]; then
    say "installed under ${destdir:-/}; not starting the agent ($systemd_skip_reason)"
    exit 0
fi

systemd-tmpfiles --create /usr/lib/tmpfiles.d/nodeseal.conf || die "systemd-tmpfiles --create /usr/lib/tmpfiles.d/nodeseal.conf failed"
systemctl daemon-reload || die "systemctl daemon-reload failed"
systemctl enable --quiet nodeseal-agent.socket nodeseal-agent.service || die "systemctl enable nodeseal-agent failed"
if [ "$changed" = 1 ] && systemctl is-active --quiet nodeseal-agent.service; then
    say "restarting nodeseal-agent to pick up the new files"
    systemctl restart --no-block nodeseal-agent.service || die "systemctl restart nodeseal-agent.service failed"
else
    systemctl start --no-block nodeseal-agent.socket nodeseal-agent.service || die "systemctl start nodeseal-agent failed"
fi

socket_path="$(sed -n 's/.*"socket_path": *"\([^"]*\)".*/\1/p' "$config" | head -n 1)"
socket_path="${socket_path:-/run/nodeseal/agent.sock}"
waited=0
while :; do
    state="$(systemctl is-active nodeseal-agent.service 2>/dev/null || true)"
    if [ "$state" = failed ]; then
        systemctl status --no-pager nodeseal-agent.service >&2 || true
        die "nodeseal-agent.service failed to start; see 'journalctl -u nodeseal-agent' (last lines above)"
    fi
    # Type=notify: "active" means the agent sent READY=1 (keys and env files loaded). The
    # health request then proves the socket path answers.
    health=""
    if [ "$state" = active ]; then
        if command -v nodeseal-client >/dev/null 2>&1; then
            health="$(NODESEAL_RETRY_SECS=1 nodeseal-client health --socket "$socket_path" 2>&1)" && break
        elif [ -S "$socket_path" ]; then
            break
        else
            health="no socket at $socket_path"
        fi
    fi
    if [ "$waited" -ge "$ready_timeout" ]; then
        systemctl status --no-pager nodeseal-agent.service >&2 || true
        [ -z "$health" ] || echo "$prog: last health check: $health" >&2
        die "nodeseal-agent was not ready after ${ready_timeout}s (state: ${state:-unknown}); see 'journalctl -u nodeseal-agent'"
    fi
    sleep 1
    waited=$((waited + 1))
done
say "nodeseal-agent is running and answers on $socket_path"
nodeseal-agent --config /etc/nodeseal/agent.json status 2>/dev/null || true
