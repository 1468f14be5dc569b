#!/bin/sh
# Fill the checkpoint volume once (the init container of every Ray pod runs this).
#
# Environment:
#   SOURCE      tiny | huggingface | url | existing
#   DEST        the checkpoint folder (<mountPath>/<subPath>)
#   SOURCE_ID   what DEST must hold; written to DEST/.supernet-router-source when
#               filled. A pod that finds the same marker skips the download; a
#               different marker (another repository, revision or URL) refills.
#   tiny:        TINY_LAYERS, TINY_SEED, TINY_WINDOW
#   huggingface: HF_REPO, HF_REVISION, HF_ALLOW_PATTERNS (comma-separated), HF_TOKEN
#   url:         URL (http(s)://...tar[.gz|.xz|.bz2], s3://bucket/prefix/ or s3://bucket/key.tar.gz)
#   LOCK_STALE_MINUTES  a fill lock untouched this long was left by a dead pod (default 10)
#
# Pods sharing one volume take turns through a lock folder (mkdir is atomic):
# the first fills, the others wait for its marker. The filler touches the lock
# every minute, so a lock left by a killed pod goes stale and is taken over.
set -eu

: "${SOURCE:?SOURCE is not set}" "${DEST:?DEST is not set}" "${SOURCE_ID:?SOURCE_ID is not set}"
marker="$DEST/.supernet-router-source"
lock="$DEST.lock"
stale="${LOCK_STALE_MINUTES:-10}"

log() { echo "fill-checkpoint: $*"; }
ready() { [ -f "$marker" ] && [ "$(cat "$marker")" = "$SOURCE_ID" ]; }

if [ "$SOURCE" = existing ]; then
    if [ -f "$DEST/config.json" ]; then
        log "using the checkpoint already in $DEST"
        exit 0
    fi
    log "checkpoint.source is existing but $DEST/config.json is missing" >&2
    exit 1
fi

if ready; then
    log "$DEST already holds $SOURCE_ID"
    exit 0
fi

mkdir -p "$(dirname "$DEST")"
while ! mkdir "$lock" 2>/dev/null; do
    if ready; then
        log "$DEST was filled by another pod ($SOURCE_ID)"
        exit 0
    fi
    if [ -n "$(find "$lock" -maxdepth 0 -mmin +"$stale" 2>/dev/null)" ]; then
        log "taking over a lock untouched for $stale minutes: $lock"
        rm -rf "$lock"
        continue
    fi
    log "another pod is filling $DEST; waiting"
    sleep 15
done
(while sleep 60; do touch -c "$lock" || exit 0; done) </dev/null >/dev/null 2>&1 &
keeper=$!
trap 'kill "$keeper" 2>/dev/null || true; rm -rf "$lock"' EXIT INT TERM

if ready; then  # filled while this pod waited for the lock
    exit 0
fi
if [ -f "$marker" ]; then  # another source's checkpoint: start afresh
    log "replacing $(cat "$marker") in $DEST"
    rm -rf "$DEST"
fi
log "filling $DEST from $SOURCE_ID (a partial earlier fill is resumed or overwritten)"
mkdir -p "$DEST"

# A tar stream (stdin, or the http(s) URL given) into DEST; compression is detected.
untar_py='
import os, sys, tarfile, urllib.request
stream = urllib.request.urlopen(sys.argv[1], timeout=60) if len(sys.argv) > 1 else sys.stdin.buffer
with tarfile.open(fileobj=stream, mode="r|*") as archive:
    archive.extractall(os.environ["DEST"], filter="data")
'
untar() { python3 -c "$untar_py" "$@"; }

hf_py='
import os
from huggingface_hub import snapshot_download
patterns = [p for p in os.environ.get("HF_ALLOW_PATTERNS", "").split(",") if p] or None
snapshot_download(repo_id=os.environ["HF_REPO"], revision=os.environ.get("HF_REVISION") or None,
                  local_dir=os.environ["DEST"], allow_patterns=patterns)
'

case "$SOURCE" in
    tiny)
        supernet-router checkpoint tiny --out "$DEST" --layers "${TINY_LAYERS:-6}" \
            --seed "${TINY_SEED:-0}" --window "${TINY_WINDOW:-16}" >/dev/null
        ;;
    huggingface)
        python3 -c "$hf_py"
        ;;
    url)
        : "${URL:?URL is not set}"
        case "$URL" in
            s3://*.tar|s3://*.tar.gz|s3://*.tgz|s3://*.tar.xz|s3://*.tar.bz2)
                aws s3 cp --only-show-errors "$URL" - | untar ;;
            s3://*)
                aws s3 cp --only-show-errors --recursive "$URL" "$DEST" ;;
            http://*|https://*)
                untar "$URL" ;;
            *)
                log "URL must be http(s):// or s3://, got $URL" >&2
                exit 2 ;;
        esac
        ;;
    *)
        log "unknown SOURCE $SOURCE (tiny, huggingface, url or existing)" >&2
        exit 2
        ;;
esac

if [ ! -f "$DEST/config.json" ]; then
    log "$SOURCE_ID gave no config.json in $DEST: not a checkpoint folder (an archive needs config.json at its root)" >&2
    exit 1
fi
printf '%s' "$SOURCE_ID" > "$marker.tmp"
mv "$marker.tmp" "$marker"
log "done: $(du -sh "$DEST" | cut -f1) in $DEST"
