"""Network emulation, pure: per-uplink latency and loss, and CoAP's retransmission rules.

The draws are made when the schedule is built (seeded), so the ground truth knows which
uplinks the network will lose and how many CoAP transmissions each needs; the transports
then act them out on real sockets. RFC 7252 §4.8 transmission parameters:

    ACK_TIMEOUT 2 s, ACK_RANDOM_FACTOR 1.5, MAX_RETRANSMIT 4
    the first timeout is random in [ACK_TIMEOUT, ACK_TIMEOUT * ACK_RANDOM_FACTOR] and
    doubles after each retransmission; EXCHANGE_LIFETIME is 247 s.

`time_scale` shrinks those waits (0.01 turns 2 s into 20 ms) so a lossy months-long run
still takes minutes; 1.0 keeps RFC timing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator.fleet import Transport

ACK_TIMEOUT_S = 2.0
ACK_RANDOM_FACTOR = 1.5
MAX_RETRANSMIT = 4
EXCHANGE_LIFETIME_S = 247.0


@dataclass(frozen=True)
class NetworkModel:
    """Loss probability per transmission, one-way latency (mean, jitter) and time scale."""

    loss: float = 0.0
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        """Reject a loss outside [0, 1) and negative times."""
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"loss must be in [0, 1), got {self.loss}")
        if min(self.latency_ms, self.jitter_ms) < 0 or self.time_scale <= 0:
            raise ValueError("latency, jitter must be >= 0 and time_scale > 0")


@dataclass(frozen=True)
class Delivery:
    """How the network treats one uplink: transmissions lost first, whether the reply is
    lost (so the sender repeats the same message), whether it is lost for good, and the
    one-way latency to apply."""

    lost_transmissions: int = 0
    reply_lost: bool = False
    lost: bool = False
    latency_ms: int = 0


def initial_timeout_s(rng: np.random.Generator, scale: float = 1.0) -> float:
    """First CON timeout: uniform in [ACK_TIMEOUT, ACK_TIMEOUT * ACK_RANDOM_FACTOR], scaled."""
    return float(rng.uniform(ACK_TIMEOUT_S, ACK_TIMEOUT_S * ACK_RANDOM_FACTOR)) * scale


def backoff_s(first_timeout_s: float, retransmission: int) -> float:
    """Wait before retransmission number `retransmission` (1-based): the timeout doubles."""
    return first_timeout_s * 2.0 ** (retransmission - 1)


def draw(model: NetworkModel, transport: Transport, rng: np.random.Generator) -> Delivery:
    """One uplink's fate under `model`.

    CoAP CON is retransmitted up to MAX_RETRANSMIT times, so it is lost only when all
    MAX_RETRANSMIT + 1 transmissions are; a lost ACK makes the device repeat the CON.
    CoAP NON and MQTT QoS 0 are lost with probability `loss`; MQTT QoS 1 rides TCP and the
    broker's acknowledgement, so the emulator never loses it.
    """
    latency = model.latency_ms + (model.jitter_ms * float(rng.random()) if model.jitter_ms else 0)
    if model.loss <= 0.0:
        return Delivery(latency_ms=round(latency))
    if transport is Transport.COAP_CON:
        lost_tx = 0
        while lost_tx <= MAX_RETRANSMIT and rng.random() < model.loss:
            lost_tx += 1
        if lost_tx > MAX_RETRANSMIT:
            return Delivery(lost_transmissions=lost_tx, lost=True, latency_ms=round(latency))
        # the ACK can be lost only if a retransmission is still allowed to follow
        reply_lost = lost_tx < MAX_RETRANSMIT and bool(rng.random() < model.loss)
        return Delivery(lost_tx, reply_lost, False, round(latency))
    if transport in (Transport.MQTT_QOS1, Transport.COAP_DTLS, Transport.PLATFORM_ONENET):
        # TCP, or a DTLS session whose CON retransmissions the library makes (the emulator
        # cannot drop records inside it), or the platform's own delivery: not lost here
        return Delivery(latency_ms=round(latency))
    return Delivery(lost=bool(rng.random() < model.loss), latency_ms=round(latency))
