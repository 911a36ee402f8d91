#!/usr/bin/env bash
# Shutdown script of a cheap-serve worker VM (instance metadata `shutdown-script`).
#
# GCE gives a preempted spot VM about 30 s. The worker already drains on its own when it sees
# `instance/preempted`; this script makes sure by stopping the service (SIGTERM) and waiting for
# it, within WAIT_SECONDS (default 25), so the checkpoint and the nacks get out.
#   SYSTEMCTL     systemctl command (default: systemctl)
#   WAIT_SECONDS  longest wait for the drain (default: 25)
set -euo pipefail

SYSTEMCTL="${SYSTEMCTL:-systemctl}"
WAIT_SECONDS="${WAIT_SECONDS:-25}"
UNIT="cheap-serve-worker.service"

if ! "$SYSTEMCTL" is-active --quiet "$UNIT"; then
  exit 0
fi
echo "cheap-serve shutdown: draining $UNIT" >&2
started=$SECONDS
# `stop` sends the unit's KillSignal (SIGTERM) and, unlike `kill`, keeps Restart=always from
# starting it again; it returns when the worker has exited (at most its TimeoutStopSec).
if timeout "$WAIT_SECONDS" "$SYSTEMCTL" stop "$UNIT"; then
  echo "cheap-serve shutdown: drained in $((SECONDS - started)) s" >&2
else
  echo "cheap-serve shutdown: $UNIT did not stop within ${WAIT_SECONDS} s" >&2
fi
