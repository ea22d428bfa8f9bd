#!/bin/sh
# Renders server.properties from the launcher's template, formats the storage on first start, runs
# the broker in the foreground.
set -eu
conf=/tmp/server.properties
# One node by default; a cluster sets KAFKA_NODE_ID, KAFKA_VOTERS (id@host:controller_port,...),
# KAFKA_REPLICATION and KAFKA_MIN_ISR per broker, and one KAFKA_CLUSTER_ID for all its brokers
# (every node of a KRaft cluster must be formatted with the same id; alone, a node makes its own).
node_id="${KAFKA_NODE_ID:-1}"
voters="${KAFKA_VOTERS:-${node_id}@127.0.0.1:${KAFKA_CONTROLLER_PORT}}"
sed -e "s|\${port}|${KAFKA_PORT}|g" -e "s|\${controller_port}|${KAFKA_CONTROLLER_PORT}|g" \
    -e "s|\${data_dir}|${KAFKA_DATA}|g" -e "s|\${node_id}|${node_id}|g" -e "s|\${voters}|${voters}|g" \
    -e "s|\${replication}|${KAFKA_REPLICATION:-1}|g" -e "s|\${min_isr}|${KAFKA_MIN_ISR:-1}|g" \
    -e "s|127\.0\.0\.1|${KAFKA_HOST}|g" \
    /opt/kafka/server.properties.template > "$conf"
if grep -q '\${' "$conf"; then
  echo "kafka: unrendered settings in server.properties:" >&2; grep '\${' "$conf" >&2; exit 2
fi
set -- "-Xmx${KAFKA_HEAP}" -Xms128m -XX:+UseG1GC -Djava.awt.headless=true \
  -Dlog4j2.configurationFile=/opt/kafka/log4j2.properties -cp '/opt/kafka/libs/*'
if [ ! -f "${KAFKA_DATA}/meta.properties" ]; then
  cluster="${KAFKA_CLUSTER_ID:-}"
  [ -n "$cluster" ] || cluster="$(java "$@" kafka.tools.StorageTool random-uuid | tail -1)"
  java "$@" kafka.tools.StorageTool format -t "$cluster" -c "$conf" >/dev/null
fi
echo "kafka: starting on ${KAFKA_HOST}:${KAFKA_PORT} (controller ${KAFKA_CONTROLLER_PORT})"
exec java "$@" kafka.Kafka "$conf"
