#!/bin/bash
# copy every new version of a checkpoint (written atomically after each round): watch.sh CKPT DIR
ck="$1"; dir="$2"; mkdir -p "$dir"; last=""
while true; do
  if [ -f "$ck" ]; then
    m=$(stat -c %Y.%s "$ck")  # modification time and size
    if [ "$m" != "$last" ]; then sleep 1; cp "$ck" "$dir/$(date +%s%N).npz"; last=$m; fi
  fi
  sleep 5
done
