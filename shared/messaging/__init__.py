"""The bus: connecting, publishing, consuming, reading history completely, the plan read back, the embedded NATS
server and the declaration of the streams."""
