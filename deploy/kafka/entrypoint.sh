#!/bin/sh
# Renders server.properties from the launcher's template, formats the storage on first start, runs
# the broker in the foreground.
set -eu
conf=/tmp/server.properties
sed -e "s|\${port}|${KAFKA_PORT}|g" -e "s|\${controller_port}|${KAFKA_CONTROLLER_PORT}|g" \
    -e "s|\${data_dir}|${KAFKA_DATA}|g" -e "s|127\.0\.0\.1|${KAFKA_HOST}|g" \
    /opt/kafka/server.properties.template > "$conf"
set -- "-Xmx${KAFKA_HEAP}" -Xms128m -XX:+UseG1GC -Djava.awt.headless=true \
  -Dlog4j2.configurationFile=/opt/kafka/log4j2.properties -cp '/opt/kafka/libs/*'
if [ ! -f "${KAFKA_DATA}/meta.properties" ]; then
  cluster="$(java "$@" kafka.tools.StorageTool random-uuid | tail -1)"
  java "$@" kafka.tools.StorageTool format -t "$cluster" -c "$conf" >/dev/null
fi
echo "kafka: starting on ${KAFKA_HOST}:${KAFKA_PORT} (controller ${KAFKA_CONTROLLER_PORT})"
exec java "$@" kafka.Kafka "$conf"
