"""The fleet server: ingest to InfluxDB, the terminal registry and presence, the ops API."""
