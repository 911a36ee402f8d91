#!/usr/bin/env bash
# Startup script of a cheap-serve worker VM (instance metadata `startup-script`).
#
# Runs on every boot, so a preempted VM that comes back resumes work with no human. It is
# idempotent: a second run with the same metadata changes no file and restarts nothing.
#   1. reads its settings from instance metadata;
#   2. installs the pinned batch-worker release and the ONNX Runtime GPU bundle (each checked
#      against its sha256, each only once per version);
#   3. writes the environment file and the systemd unit, and (re)starts the service.
#
# Everything it touches is overridable, so tests run it in a scratch root:
#   ROOT          prefix of every path written (default: /)
#   METADATA_URL  metadata server base (default: http://metadata.google.internal/computeMetadata/v1)
#   SYSTEMCTL     systemctl command (default: systemctl)
#   HOSTNAME_CMD  prints the worker id (default: hostname)
set -euo pipefail

ROOT="${ROOT:-}"
METADATA_URL="${METADATA_URL:-http://metadata.google.internal/computeMetadata/v1}"
SYSTEMCTL="${SYSTEMCTL:-systemctl}"
HOSTNAME_CMD="${HOSTNAME_CMD:-hostname}"

APP="$ROOT/opt/cheap-serve"
ETC="$ROOT/etc/cheap-serve"
UNIT_DIR="$ROOT/etc/systemd/system"
UNIT="cheap-serve-worker.service"

log() { echo "cheap-serve startup: $*" >&2; }

# metadata PATH [DEFAULT]: a metadata value; DEFAULT (or failure) when it is absent.
metadata() {
  local value
  if value="$(curl -fsS --retry 5 --retry-connrefused -H 'Metadata-Flavor: Google' "$METADATA_URL/$1" 2>/dev/null)"; then
    printf '%s' "$value"
  elif [[ $# -ge 2 ]]; then
    printf '%s' "$2"
  else
    log "required metadata $1 is missing"
    return 1
  fi
}

# fetch URL DEST: http(s) with curl, gs:// with gcloud storage.
fetch() {
  case "$1" in
    gs://*) gcloud storage cp --quiet "$1" "$2" ;;
    http://* | https://* | file://*) curl -fsSL --retry 5 --retry-connrefused -o "$2" "$1" ;;
    *)
      log "unsupported URL $1"
      return 1
      ;;
  esac
}

# install NAME VERSION URL SHA256: unpacks the tarball into $APP/NAME/VERSION once.
install() {
  local name="$1" version="$2" url="$3" sha="$4"
  local dest="$APP/$name/$version"
  if [[ -f "$dest/.installed" ]] && [[ "$(cat "$dest/.installed")" == "$sha" ]]; then
    return 0
  fi
  log "installing $name $version from $url"
  local tmp
  tmp="$(mktemp -d "$APP/.download.XXXXXX")"
  # give_up WHY: says why, removes the download; the caller returns 1.
  give_up() {
    log "$name $version: $1"
    rm -rf "$tmp"
  }
  if ! fetch "$url" "$tmp/archive.tar.gz"; then
    give_up "cannot fetch $url"
    return 1
  fi
  if [[ "$(sha256sum "$tmp/archive.tar.gz" | cut -d' ' -f1)" != "$sha" ]]; then
    give_up "sha256 mismatch for $url"
    return 1
  fi
  mkdir -p "$tmp/unpacked"
  if ! tar -xzf "$tmp/archive.tar.gz" -C "$tmp/unpacked"; then
    give_up "$url is not a gzipped tarball"
    return 1
  fi
  rm -rf "$dest"
  mkdir -p "$(dirname "$dest")"
  mv "$tmp/unpacked" "$dest"
  echo "$sha" >"$dest/.installed"
  rm -rf "$tmp"
}

# write_if_changed PATH: stdin to PATH only when the content differs; prints "changed" then.
write_if_changed() {
  local path="$1" tmp
  tmp="$(mktemp "$path.XXXXXX")"
  cat >"$tmp"
  if [[ -f "$path" ]] && cmp -s "$tmp" "$path"; then
    rm -f "$tmp"
  else
    chmod 0644 "$tmp"
    mv "$tmp" "$path"
    echo changed
  fi
}

main() {
  mkdir -p "$APP" "$ETC" "$UNIT_DIR"

  local project version url sha ort_url ort_sha
  project="$(metadata project/project-id)"
  version="$(metadata instance/attributes/worker-version)"
  url="$(metadata instance/attributes/worker-url)"
  sha="$(metadata instance/attributes/worker-sha256)"
  ort_url="$(metadata instance/attributes/ort-url)"
  ort_sha="$(metadata instance/attributes/ort-sha256)"
  local subscription chat_subscription chat_topic dead_letter dead_letter_watch jobs_topic output_root poison device
  subscription="$(metadata instance/attributes/pubsub-subscription worker)"
  chat_subscription="$(metadata instance/attributes/chat-subscription "")"
  chat_topic="$(metadata instance/attributes/chat-topic "")"
  dead_letter="$(metadata instance/attributes/dead-letter-topic jobs-dead)"
  dead_letter_watch="$(metadata instance/attributes/dead-letter-watch jobs-dead-watch)"
  jobs_topic="$(metadata instance/attributes/jobs-topic jobs)"
  output_root="$(metadata instance/attributes/output-root)"
  poison="$(metadata instance/attributes/poison-limit 5)"
  device="$(metadata instance/attributes/device auto)"
  # Optional: the text-generation model folder as its own bundle (a 3B model does not belong
  # in the worker release); without it the worker uses models/lm of the release, if any.
  local lm_url lm_sha lm_line=""
  lm_url="$(metadata instance/attributes/lm-url "")"
  lm_sha="$(metadata instance/attributes/lm-sha256 "")"

  install worker "$version" "$url" "$sha"
  install onnxruntime-gpu "$ort_sha" "$ort_url" "$ort_sha"
  local worker_dir="$APP/worker/$version" ort_dir="$APP/onnxruntime-gpu/$ort_sha"
  if [[ -n "$lm_url" ]]; then
    install lm "$lm_sha" "$lm_url" "$lm_sha"
    if [[ ! -f "$APP/lm/$lm_sha/model.onnx" ]]; then
      log "the model bundle $lm_url has no model.onnx at its top level"
      return 1
    fi
    lm_line="LM_DIR=${APP#"$ROOT"}/lm/$lm_sha"
  fi
  if [[ ! -x "$worker_dir/bin/batch-worker" ]]; then
    log "the release $url has no bin/batch-worker"
    return 1
  fi
  if [[ ! -f "$ort_dir/lib/libonnxruntime.so" ]]; then
    log "the ONNX Runtime bundle $ort_url has no lib/libonnxruntime.so"
    return 1
  fi

  local changed=""
  changed+="$(write_if_changed "$ETC/worker.env" <<EOF
# Written by the startup script from instance metadata; edits are overwritten at boot.
GCP_PROJECT=$project
PUBSUB_SUBSCRIPTION=$subscription
CHAT_SUBSCRIPTION=$chat_subscription
CHAT_TOPIC=$chat_topic
DEAD_LETTER_TOPIC=$dead_letter
DEAD_LETTER_SUBSCRIPTION=$dead_letter_watch
JOBS_TOPIC=$jobs_topic
OUTPUT_ROOT=$output_root
POISON_LIMIT=$poison
DEVICE=$device
MODEL_DIR=${worker_dir#"$ROOT"}/models
$lm_line
ORT_DYLIB_PATH=${ort_dir#"$ROOT"}/lib/libonnxruntime.so
LD_LIBRARY_PATH=${ort_dir#"$ROOT"}/lib
WORKER_ID=$("$HOSTNAME_CMD")
METRICS_ADDR=127.0.0.1:9464
RUST_LOG=warn,batch_worker=info
EOF
)"
  # With a GPU to use, the worker starts only once the driver answers (`nvidia-smi -L`): on a
  # first boot the image installs the driver while this script runs, and `auto` would settle
  # for the CPU for as long as that worker lives. Until then the check fails and systemd tries
  # again every RestartSec.
  local gpu_wait="# device=cpu: no GPU driver to wait for"
  if [[ "$device" != "cpu" ]]; then
    gpu_wait="ExecStartPre=/bin/sh -c 'nvidia-smi -L'"
  fi
  local unit_changed
  unit_changed="$(write_if_changed "$UNIT_DIR/$UNIT" <<EOF
[Unit]
Description=cheap-serve batch worker (Pub/Sub jobs, ONNX Runtime)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
EnvironmentFile=${ETC#"$ROOT"}/worker.env
$gpu_wait
ExecStart=${worker_dir#"$ROOT"}/bin/batch-worker serve
Restart=always
RestartSec=5
# Exit 2: the worker refused its settings (one line in the journal); restarting cannot help.
RestartPreventExitStatus=2
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec=25

[Install]
WantedBy=multi-user.target
EOF
)"
  changed+="$unit_changed"

  if [[ -n "$unit_changed" ]]; then
    "$SYSTEMCTL" daemon-reload
  fi
  "$SYSTEMCTL" enable "$UNIT"
  if [[ -n "$changed" ]]; then
    log "configuration changed: restarting $UNIT"
    "$SYSTEMCTL" restart "$UNIT"
  else
    "$SYSTEMCTL" start "$UNIT"
  fi
}

main "$@"
