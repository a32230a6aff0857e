"""MQTT adapters: topic layout, broker authentication, device client, ingest workers, RPC."""
