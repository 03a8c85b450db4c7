"""MQTT shell (paho-mqtt 2): shared, persistent QoS 1 subscription, acked after commit.

Devices publish to `nbmeter/<tenant-slug>/<meter-address>/up`; the broker's ACL lets a
device publish only to its own topic, so the topic names the authenticated device. The
collector subscribes to `$share/<group>/nbmeter/+/+/up` (MQTT 5 shared subscription: the
broker splits messages among collector processes) with a persistent session
(clean_start False, session expiry) under a client id that stays the same across
restarts, and `manual_ack=True`: a PUBACK goes out only when the message's batch has
committed. Until then the broker keeps the message, and redelivers it after a reconnect
or a collector restart; a redelivery is stored as a duplicate, never twice.

Scale-down (collector/mqtt_session.py has the details): a graceful stop leaves the share
group (unsubscribe, take in what the session still holds, commit and ack it) and ends the
session, so nothing waits for a collector that is gone; a crashed collector's session is
taken over by a surviving one after the will delay (`will_delay_s`).

Backpressure is the broker's flow control: the CONNECT carries Receive Maximum
(`receive_maximum`), so the broker never has more than that many unacknowledged messages
in flight to this process, however long the database is away.

TLS: an `mqtts://` URL connects with TLS 1.2+, checks the broker's certificate against
`ca_file` (or `?ca=` in the URL, or the system's CAs) and its host name.

Threading: paho's network loop runs in its own thread; its callbacks only hand work to
the event loop with `loop.call_soon_threadsafe`. PUBACKs for messages of an earlier
connection are never sent (message ids are per connection); those messages come again.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import structlog

from collector.mqtt_session import DurableHook, Role, Session, parse_topic
from collector.pipeline import Pipeline
from collector.settings import MqttSettings
from devices.address import BrokerAddress, MqttError, tls_context

__all__ = ["BrokerAddress", "MqttError", "MqttSubscriber", "parse_topic", "tls_context"]

log = structlog.get_logger("collector.mqtt")


def check_tls(address: BrokerAddress, context: ssl.SSLContext, ca_file: Path | None) -> None:
    """One TLS handshake with the broker, so a wrong CA or port fails at start with a clear
    MqttError instead of endless silent reconnects. An unreachable broker passes (it is
    retried in the background). Blocking."""
    try:
        sock = socket.create_connection((address.host, address.port), timeout=5)
    except OSError:
        return
    where = f"{address.host}:{address.port}"
    with sock:
        try:
            with context.wrap_socket(sock, server_hostname=address.host):
                pass
        except ssl.SSLCertVerificationError as exc:
            ca = ca_file or address.ca_file or "the system's CA store"
            msg = (
                f"the broker at {where} presented a certificate that {ca} does not verify "
                f"({exc.verify_message}): set NBMETER_MQTT__CA_FILE (or ?ca= in the URL) to "
                "the CA that signed it, and use the host name its certificate names"
            )
            raise MqttError(msg) from exc
        except (ssl.SSLError, OSError) as exc:
            msg = (
                f"{where} did not complete a TLS handshake ({exc}): is it the broker's TLS "
                "port? (mqtts:// needs the TLS listener; mqtt:// the plain one)"
            )
            raise MqttError(msg) from exc


class MqttSubscriber:
    """Feeds uplinks from the broker into the pipeline and acks them once durable."""

    def __init__(
        self,
        url: str,
        settings: MqttSettings,
        pipeline: Pipeline,
        on_durable: DurableHook | None = None,
    ) -> None:
        """Prepare (not yet connect) a subscriber to the broker at `url`; `on_durable` gets
        each stored uplink's (tenant slug, address) and meter id (the mailbox's downlinks)."""
        self._on_durable = on_durable
        self._address = BrokerAddress.parse(url)
        self._settings = settings
        self._pipeline = pipeline
        self._tls = tls_context(self._address, settings.ca_file)
        self._own = self._session(settings.client_id, "member")
        self._watcher = self._session(f"{settings.client_id}.watch", "watcher")
        self._adoptions: dict[str, asyncio.Task[None]] = {}
        self._will_acks: dict[str, list[Callable[[], None]]] = {}

    def _session(self, client_id: str, role: Role) -> Session:
        address = self._address
        return Session(
            host=address.host,
            port=address.port,
            credentials=(address.username, address.password) if address.username else None,
            tls=self._tls,
            settings=self._settings,
            pipeline=self._pipeline,
            client_id=client_id,
            role=role,
            adopt=self._adopt,
            on_durable=self._on_durable,
        )

    async def start(self) -> None:
        """Connect (in the background: an absent broker is retried) and start paho's thread.

        Raises MqttError when the broker answers but its TLS does not verify."""
        if self._tls is not None:
            await asyncio.to_thread(check_tls, self._address, self._tls, self._settings.ca_file)
        self._own.start()
        self._watcher.start()

    async def leave(self) -> None:
        """Leave the share group: take in what our session holds, finish running adoptions.

        Call it while the pipeline still accepts; then close the pipeline, drain it and
        call `drain_and_stop`."""
        await self._own.leave()
        try:
            async with asyncio.timeout(self._settings.leave_timeout_s):
                while self._adoptions:
                    await asyncio.wait(list(self._adoptions.values()))
        except TimeoutError:
            log.warning("broker.adoption_unfinished", peers=sorted(self._adoptions))
        await self._watcher.finish(end_session=False)  # its session (and wills) end with it

    async def drain_and_stop(self) -> None:
        """Wait for the in-flight messages to be acked, then end (or keep) the session."""
        for task in list(self._adoptions.values()):
            task.cancel()  # the adopter leaves the peer's session with its will published
        await self._own.finish(end_session=True)

    # -- taking over a crashed collector's session ------------------------------------------

    def _adopt(self, peer: str, ack: Callable[[], None]) -> None:
        """A peer's will came: take its session over (once), then acknowledge the will."""
        self._will_acks.setdefault(peer, []).append(ack)
        if peer not in self._adoptions:
            task = asyncio.get_running_loop().create_task(
                self._adoption(peer), name=f"adopt:{peer}"
            )
            self._adoptions[peer] = task
            task.add_done_callback(lambda _t: self._adoptions.pop(peer, None))

    async def _adoption(self, peer: str) -> None:
        timeout_s = self._settings.leave_timeout_s
        while True:
            session = self._session(peer, "adopter")
            session.start()
            try:
                await session.wait_connected(timeout_s)
            except TimeoutError:
                await session.finish(end_session=False)
                log.warning("broker.adoption_retried", peer=peer, why="could not connect")
                await asyncio.sleep(5)
                continue
            try:
                await session.leave()
                session.clear_will()
                ended = await session.finish(end_session=True)
            except asyncio.CancelledError:
                await session.abandon()
                raise
            # ended, taken over by the peer itself, or kept with its will published again:
            # in every case someone owns what is left, so this will is done
            log.info(
                "broker.session_adopted",
                peer=peer,
                ended=ended,
                taken_over=session.taken_over,
                session_present=session.session_present,
                messages=session.taken_in,
            )
            for ack in self._will_acks.pop(peer, []):
                ack()
            return
