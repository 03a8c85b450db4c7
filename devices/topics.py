"""The broker's topic names: what a meter may publish to, and the collector's own topics.

The dynamic-security ACLs (`devices.broker`) and the collector's subscriptions
(`collector.mqtt_session`) are built from these, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Final

UPLINK_FILTER: Final = "nbmeter/+/+/up"  # every meter's uplink topic
DOWN_FILTER: Final = "nbmeter/+/+/down"  # commands to a meter (the mailbox, issue 13)
RESULT_FILTER: Final = "nbmeter/+/+/res"  # a meter's answers to its commands
CONTROL_ROOT: Final = "nbmeter-collector"  # collectors' wills and drain markers live below


def device_username(tenant_slug: str, address: str) -> str:
    """The broker username of a meter: `<tenant-slug>/<address>`."""
    return f"{tenant_slug}/{address}"


def uplink_topic(tenant_slug: str, address: str) -> str:
    """The one topic a meter may publish to."""
    return f"nbmeter/{tenant_slug}/{address}/up"


def down_topic(uplink: str) -> str:
    """The one topic a meter may subscribe to: its commands (from its uplink topic)."""
    return uplink.removesuffix("/up") + "/down"


def result_topic(uplink: str) -> str:
    """The topic a meter publishes its answers to commands on (from its uplink topic)."""
    return uplink.removesuffix("/up") + "/res"
