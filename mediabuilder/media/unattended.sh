#!/usr/bin/env bash
# unattended.sh - the unattended install, run by the installer's boot entry
# "Install HOST offline (unattended)" as systemd's kernel-command-line.service
# (systemd.run=/iso/mediabuilder/unattended.sh on the kernel line; docs/installer.md).
#
# Runs install.sh --unattended from this directory, its output on the console and in a log. On
# success install.sh's last line is "mediabuilder: installed HOST onto DEVICE" and this exits 0
# (systemd then powers off: systemd.run_success_action=poweroff). On failure it prints
#   mediabuilder: install failed: <install.sh's error line>
#   mediabuilder: the log is <file>
# and starts a root shell on the console (systemd.run_failure_action=none keeps the machine up);
# leaving the shell ends the unit with the install's exit status.
#
# MEDIABUILDER_LOG (default /tmp/mediabuilder-install.log, the live system's RAM) and
# MEDIABUILDER_CONSOLE (default /dev/console: the unit's own stdio goes to the journal too)
# say where the log and the shell go.
set -uo pipefail

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
log=${MEDIABUILDER_LOG:-/tmp/mediabuilder-install.log}
console=${MEDIABUILDER_CONSOLE:-/dev/console}

printf 'mediabuilder: unattended install from %s (log: %s)\n' "$here" "$log"
rc=0
bash "$here/install.sh" --unattended --media "$here" 2>&1 | tee -- "$log" || rc=$?
if ((rc == 0)); then
    exit 0
fi
line=$(grep -E '^install\.sh: error: ' -- "$log" | tail -n1)
printf 'mediabuilder: install failed: %s\n' "${line:-install.sh exited with status $rc}"
printf 'mediabuilder: the log is %s\n' "$log"
if [[ -c $console || -w $console ]]; then
    printf 'mediabuilder: a root shell; leave it to end the unit (the machine stays up)\n'
    # shellcheck disable=SC2094 # a terminal, read and written by the shell
    setsid --ctty bash -i <"$console" >"$console" 2>&1 || true
fi
exit "$rc"
