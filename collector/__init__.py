"""Collector: CoAP and MQTT uplinks, acknowledged only once durable."""
