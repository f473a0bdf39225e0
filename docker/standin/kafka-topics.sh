#!/bin/bash
# The stand-in's kafka-topics.sh: TopicCommand from the same jars, logging errors only.
exec java -Xmx256m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Dlog4j2.level=error \
    -cp '/opt/kafka/libs/*' org.apache.kafka.tools.TopicCommand "$@"
