#!/usr/bin/env bash
# The README walk-through, runnable: key -> dataset -> upload -> job -> poll until it ends ->
# classify -> delta -> history -> zero-shot model, with curl against a running `sparseshot serve`.
#
#   .venv/bin/sparseshot serve &                      # in another terminal
#   bash scripts/walkthrough.sh
#
# Environment (all optional):
#   SPARSESHOT_PORT      port of the server on 127.0.0.1 (default 8000)
#   SPARSESHOT_URL       the server's URL instead (default http://127.0.0.1:$SPARSESHOT_PORT)
#   SPARSESHOT_API_KEY   a key; otherwise one is created with `sparseshot keys create --tenant demo`
#                        (which reads the server's database: run it with the server's settings)
#   SPARSESHOT_CLI       the sparseshot command (default .venv/bin/sparseshot, else `sparseshot`)
#   PYTHON               a Python with the project installed (default .venv/bin/python, else python3)
#   PRESET               job preset (default quick)  ·  PARAMS  JSON hyperparameters (default {})
#   POLL_S / TIMEOUT_S   polling interval and limit in seconds (defaults 2 and 3600)
#   WORKDIR              where the sample images and the delta go (default a new temp folder)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
CLI=${SPARSESHOT_CLI:-$( [ -x .venv/bin/sparseshot ] && echo .venv/bin/sparseshot || echo sparseshot )}
API=${SPARSESHOT_URL:-http://127.0.0.1:${SPARSESHOT_PORT:-8000}}
PRESET=${PRESET:-quick}
PARAMS=${PARAMS:-"{}"}
POLL_S=${POLL_S:-2}
TIMEOUT_S=${TIMEOUT_S:-3600}
WORKDIR=${WORKDIR:-$(mktemp -d -t sparseshot-walkthrough.XXXXXX)}

# jget PATH: a member of the JSON on stdin ("progress.step"); empty for null.
jget() { "$PYTHON" -c 'import json, sys
v = json.load(sys.stdin)
for k in sys.argv[1].split("."):
    v = v[int(k)] if isinstance(v, list) else v[k]
print("" if v is None else v)' "$1"; }

# 1. An API key (printed alone on the last line of `keys create`).
KEY=${SPARSESHOT_API_KEY:-$($CLI keys create --tenant demo | tail -n1)}
H="Authorization: Bearer $KEY"
CURL=(curl -sS --fail-with-body -H "$H")

# 2. Sample images: three classes of coloured shapes, one folder per class, and the same as a zip.
"$PYTHON" -m sparseshot.sample_data "$WORKDIR/sample" --zip > /dev/null
TRAIN="$WORKDIR/sample/train"

# 3. A dataset, then images: files of one label, and a zip with one folder per class.
DS=$("${CURL[@]}" -H 'Content-Type: application/json' "$API/v1/datasets" \
      -d '{"name": "shapes", "classes": ["red circle", "green square", "blue triangle"]}' | jget id)
echo "dataset $DS"
"${CURL[@]}" "$API/v1/datasets/$DS/images" -F 'label=red circle' \
      -F "files=@$TRAIN/red circle/red_circle_00.png" -F "files=@$TRAIN/red circle/red_circle_01.png" > /dev/null
"${CURL[@]}" "$API/v1/datasets/$DS/images" -F "archive=@$WORKDIR/sample/train.zip" \
      | "$PYTHON" -c 'import json,sys; r=json.load(sys.stdin)
print("zip:", len(r["added"]), "added,", len(r["rejected"]), "rejected (the two files sent above are duplicates)")'
"${CURL[@]}" "$API/v1/datasets/$DS" | jget image_counts

# 4. A training job with a preset; the answer says how long it should take.
JOB_JSON=$("${CURL[@]}" -H 'Content-Type: application/json' "$API/v1/jobs" \
      -d "{\"dataset_id\": \"$DS\", \"method\": \"so\", \"preset\": \"$PRESET\", \"params\": $PARAMS}")
JOB=$(echo "$JOB_JSON" | jget id)
echo "job $JOB (preset $PRESET, estimated_seconds: $(echo "$JOB_JSON" | jget estimated_seconds))"

# 5. Poll until the job ends (GET /v1/jobs/$JOB/events streams the same as server-sent events).
DEADLINE=$((SECONDS + TIMEOUT_S))
while :; do
  J=$("${CURL[@]}" "$API/v1/jobs/$JOB")
  STATUS=$(echo "$J" | jget status)
  echo "  $STATUS  step $(echo "$J" | jget progress.step)/$(echo "$J" | jget progress.total_steps)" \
       " loss $(echo "$J" | jget progress.loss)  eta $(echo "$J" | jget progress.eta_seconds)"
  case "$STATUS" in
    succeeded) break ;;
    failed|cancelled) echo "job $STATUS: $(echo "$J" | jget error)" >&2; exit 1 ;;
  esac
  if [ "$SECONDS" -ge "$DEADLINE" ]; then echo "job still $STATUS after $TIMEOUT_S s" >&2; exit 1; fi
  sleep "$POLL_S"
done
MODEL=$(echo "$J" | jget model_id)
echo "model $MODEL"

# 6. Classify held-out images, fetch the delta and the training history.
QUERY="$WORKDIR/sample/query"
"${CURL[@]}" "$API/v1/models/$MODEL/classify" -F top_k=2 \
      -F "files=@$QUERY/red_circle_q0.png" -F "files=@$QUERY/blue_triangle_q0.png" \
      | "$PYTHON" -c 'import json,sys
for p in json.load(sys.stdin)["predictions"]:
    print(" ", p["filename"], "->", ", ".join("%s %.2f" % (l["label"], l["score"]) for l in p["labels"]))'
"${CURL[@]}" -o "$WORKDIR/$MODEL.safetensors" "$API/v1/models/$MODEL/delta"
echo "delta: $(wc -c < "$WORKDIR/$MODEL.safetensors") bytes in $WORKDIR/$MODEL.safetensors"
"${CURL[@]}" "$API/v1/jobs/$JOB/history" \
      | "$PYTHON" -c 'import json,sys; print("history:", len(json.load(sys.stdin)["items"]), "points")'

# 7. A zero-shot model of the same classes, usable at once.
ZS=$("${CURL[@]}" -H 'Content-Type: application/json' "$API/v1/models/zeroshot" \
      -d '{"classes": ["red circle", "green square", "blue triangle"]}' | jget id)
echo "zero-shot model $ZS"
echo "walk-through done"
