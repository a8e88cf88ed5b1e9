#!/bin/sh
# Builds the replica's configuration from the image's shipped one: listeners on all interfaces,
# the ERP at $CAUSEWAY_BC_URL, no embedded sandbox, the store in PostgreSQL, budgets in Redis.
set -eu
out=/tmp/causeway
mkdir -p "$out"
cp -r /etc/causeway/routes /etc/causeway/policies "$out"/
sed -e 's/127\.0\.0\.1:8080/0.0.0.0:8080/; s/127\.0\.0\.1:9090/0.0.0.0:9090/; s/127\.0\.0\.1:9091/0.0.0.0:9091/' \
    -e "s#url: http://127.0.0.1:8085#url: ${CAUSEWAY_BC_URL}#" \
    -e '/^sandbox:/,/^$/d' -e '/^store:/,/^$/d' \
    /etc/causeway/causeway.yaml > "$out/causeway.yaml"
cat /opt/causeway-overlay/cluster.yaml >> "$out/causeway.yaml"
exec causeway "$@"
