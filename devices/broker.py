"""The broker side of device authentication: initial dynsec files and live account changes.

`prepare_broker_files(state_dir)` creates, once, what `nbmeter/stack/mosquitto.conf` needs
before Mosquitto starts: `dynamic-security.json` (the admin and collector accounts and
roles), a symlink to the host's dynamic-security plugin, and `nbmeter-broker.json`
(mode 0600: the generated passwords and the credentials key). It returns the environment
additions for the collector and the CLI. It is idempotent: later calls return the same
values and never overwrite a file the running broker maintains.

`ensure_collector_acls(admin_url)` adds, live, the collector ACLs an older broker state
lacks.

`dynsec(admin_url, commands)` sends dynamic-security commands to the running broker
over `$CONTROL/dynamic-security/v1` and returns the responses: device accounts are
created, changed and removed without a restart. Raises `BrokerError`.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from devices.address import BrokerAddress, MqttError, tls_context
from devices.topics import CONTROL_ROOT, DOWN_FILTER, RESULT_FILTER, UPLINK_FILTER
from storage.credentials import hash_password, new_key

COLLECTOR_USER = "nbmeter-collector"
ADMIN_USER = "nbmeter-admin"
_PLUGIN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)
_CONTROL = "$CONTROL/dynamic-security/v1"


class BrokerError(Exception):
    """The broker could not be reached or refused a dynamic-security command."""


def _acl(acltype: str, topic: str, *, allow: bool = True) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": allow}


# the collector's uplink subscription, its control topics (wills and drain markers,
# see collector/mqtt_session.py), the tenants' alert topics (collector/alerts_mqtt.py)
# and the mailbox's commands and answers (collector/downlink_mqtt.py)
_COLLECTOR_ACLS = (
    _acl("publishClientSend", "nbmeter/+/alerts"),
    _acl("subscribePattern", UPLINK_FILTER),
    _acl("subscribePattern", f"$share/+/{UPLINK_FILTER}"),
    _acl("publishClientReceive", UPLINK_FILTER),
    _acl("publishClientSend", DOWN_FILTER),
    _acl("subscribePattern", RESULT_FILTER),
    _acl("subscribePattern", f"$share/+/{RESULT_FILTER}"),
    _acl("publishClientReceive", RESULT_FILTER),
    _acl("publishClientSend", f"{CONTROL_ROOT}/#"),
    _acl("publishClientReceive", f"{CONTROL_ROOT}/#"),
    _acl("subscribePattern", f"{CONTROL_ROOT}/#"),
    _acl("subscribePattern", f"$share/+/{CONTROL_ROOT}/#"),
)


def _client(username: str, password: str, role: str) -> dict[str, Any]:
    digest, salt, iterations = hash_password(password)
    return {
        "username": username,
        "password": digest,
        "salt": salt,
        "iterations": iterations,
        "roles": [{"rolename": role}],
    }


def _initial_config(collector_pw: str, admin_pw: str) -> dict[str, Any]:
    return {
        "clients": [
            _client(ADMIN_USER, admin_pw, "admin"),
            _client(COLLECTOR_USER, collector_pw, "collector"),
        ],
        "roles": [
            {
                "rolename": "admin",
                "acls": [
                    _acl("publishClientSend", "$CONTROL/dynamic-security/#"),
                    _acl("publishClientReceive", "$CONTROL/dynamic-security/#"),
                    _acl("subscribePattern", "$CONTROL/dynamic-security/#"),
                    _acl("unsubscribePattern", "#"),
                ],
            },
            {"rolename": "collector", "acls": [*_COLLECTOR_ACLS, _acl("unsubscribePattern", "#")]},
        ],
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": True,
            "subscribe": False,
            "unsubscribe": True,
        },
    }


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def _plugin() -> str:
    for candidate in _PLUGIN_PATHS:
        if Path(candidate).exists():
            return candidate
    msg = "Mosquitto's dynamic-security plugin was not found; install the mosquitto package"
    raise BrokerError(msg)


def prepare_broker_files(state_dir: Path, port: int | None = None) -> dict[str, str]:
    """Create the broker's initial credential files in `state_dir`; return env additions.

    Returns NBMETER_MQTT_URL (the collector account), NBMETER_MQTT_ADMIN_URL (the
    provisioning account) and NBMETER_CREDENTIALS_KEY. `port` defaults to
    $NBMETER_MQTT_PORT or 51883.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    if port is None:
        port = int(os.environ.get("NBMETER_MQTT_PORT", "51883"))
    secrets_file = state_dir / "nbmeter-broker.json"
    if secrets_file.exists():
        saved = json.loads(secrets_file.read_text(encoding="utf-8"))
    else:
        saved = {
            "collector_password": secrets.token_urlsafe(18),
            "admin_password": secrets.token_urlsafe(18),
            "credentials_key": new_key(),
        }
        _write_private(secrets_file, json.dumps(saved, indent=2))
    dynsec_file = state_dir / "dynamic-security.json"
    if not dynsec_file.exists():  # afterwards the broker owns it (it saves every change)
        config = _initial_config(saved["collector_password"], saved["admin_password"])
        _write_private(dynsec_file, json.dumps(config, indent=2))
    link = state_dir / "mosquitto_dynamic_security.so"
    if not link.exists():
        if link.is_symlink():
            link.unlink()
        link.symlink_to(_plugin())

    def url(user: str, password: str) -> str:
        return f"mqtt://{user}:{quote(password, safe='')}@127.0.0.1:{port}"

    return {
        "NBMETER_MQTT_URL": url(COLLECTOR_USER, saved["collector_password"]),
        "NBMETER_MQTT_ADMIN_URL": url(ADMIN_USER, saved["admin_password"]),
        "NBMETER_CREDENTIALS_KEY": saved["credentials_key"],
    }


def dynsec(
    admin_url: str, commands: list[dict[str, Any]], timeout_s: float = 10.0
) -> list[dict[str, Any]]:
    """Send dynamic-security `commands` to the broker; return one response per command.

    Blocking (run it in a thread from async code). Raises BrokerError when the broker
    cannot be reached or does not answer within `timeout_s`.
    """
    address = BrokerAddress.parse(admin_url)
    # every admin connection gets every response: ours are the ones echoing our tag
    tag = secrets.token_hex(8)
    commands = [{**c, "correlationData": f"{tag}:{i}"} for i, c in enumerate(commands)]
    done = threading.Event()
    ready = threading.Event()
    answer: dict[str, Any] = {}
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    if address.username:
        client.username_pw_set(address.username, address.password)
    try:
        context = tls_context(address)
    except MqttError as exc:
        raise BrokerError(str(exc)) from exc
    if context is not None:
        client.tls_set_context(context)

    def on_connect(c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            answer["error"] = f"broker refused the admin login: {reason}"
            done.set()
            return
        c.subscribe(f"{_CONTROL}/response", qos=1)

    def on_subscribe(_c: Any, _u: Any, _m: Any, _r: Any, _p: Any) -> None:
        ready.set()

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        body = json.loads(msg.payload)
        mine = [
            r for r in body.get("responses", [])
            if str(r.get("correlationData", "")).startswith(f"{tag}:")
        ]  # fmt: skip
        if mine:  # another connection's answer (or a bare error of its own) is not ours
            answer["responses"] = mine
            done.set()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    try:
        client.connect(address.host, address.port, keepalive=30)
    except OSError as exc:  # ssl.SSLError included
        msg = f"cannot reach the broker at {address.host}:{address.port}: {exc}"
        raise BrokerError(msg) from exc
    client.loop_start()
    try:
        if not ready.wait(timeout_s) and not done.is_set():
            msg = "the broker did not confirm the admin subscription"
            raise BrokerError(msg)
        if not done.is_set():
            client.publish(_CONTROL, json.dumps({"commands": commands}), qos=1)
        if not done.wait(timeout_s):
            msg = "the broker did not answer the dynamic-security command"
            raise BrokerError(msg)
    finally:
        client.disconnect()
        client.loop_stop()
    if "error" in answer:
        raise BrokerError(str(answer["error"]))
    responses: list[dict[str, Any]] = answer.get("responses", [])
    return responses


def ensure_collector_acls(admin_url: str) -> int:
    """Give the running broker's collector role every ACL it needs; return how many it lacked.

    A broker whose dynamic-security.json predates an ACL (the file is written once, then
    the broker owns it) gets it here, live. Raises BrokerError.
    """
    commands = [
        {"command": "addRoleACL", "rolename": "collector", **acl} for acl in _COLLECTOR_ACLS
    ]
    added = 0
    for response in dynsec(admin_url, commands):
        error = str(response.get("error", ""))
        if not error:
            added += 1
        elif "already exists" not in error:
            msg = f"the broker refused to add a collector ACL: {error}"
            raise BrokerError(msg)
    return added
