"""The common OSCORE request and its first answer, from aiocoap's own OSCORE pieces.

An uplink to `/u` is one POST with a kid and a partial IV, fresh in its context's replay
window, answered once. For that case `unprotect` and `protect` do what aiocoap's
`CanUnprotect.unprotect` and `CanProtect.protect` do, with the same pieces (its option
decompression, replay window and the context's AEAD algorithm object; no cryptography of
ours) and the request's AAD and nonce as `collector.coap_oscore.DeviceContext` makes them
(aiocoap's bytes, tests hold them equal), without what the general case needs: message
copies, eager debug formatting, a second AAD and nonce for the answer (RFC 8613 §8.3: a
first answer reuses the request's nonce, so its AAD and nonce are the request's).
`bench/oscore_path.py` measures the difference (about 28 µs of CPU per uplink) and holds
the answers byte-identical to aiocoap's.

Anything else (a replay, a kid context, a group message, an unexpected field, a second
answer) returns None or goes to aiocoap's full path, which decides and answers as before.
"""
# aiocoap is untyped (as in collector.coap_oscore)
# mypy: disable-error-code="no-any-return"

from __future__ import annotations

from typing import Any

import aiocoap
from aiocoap import oscore
from aiocoap.message import Direction


class LeanRequest:
    """What the answer needs of a request unprotected here: the aiocoap request
    identifiers (whose flag says the nonce was reused once), the AAD and the nonce."""

    __slots__ = ("aad", "nonce", "request_id")

    def __init__(self, request_id: Any, aad: bytes, nonce: bytes) -> None:
        self.request_id, self.aad, self.nonce = request_id, aad, nonce


def unprotect(ctx: Any, request: aiocoap.Message) -> tuple[aiocoap.Message, LeanRequest] | None:
    """(inner request, LeanRequest) of `request`, an OSCORE request for `ctx`, in the
    common case; None when aiocoap's full path must decide (a replayed or unchecked
    sequence number, a kid context, a protected or unknown field, no partial IV).
    Raises oscore.ProtectionInvalid when it does not decrypt (RFC 8613 §8.2 step 6), as
    aiocoap's path would; the replay window moves only after a successful decryption."""
    _, protected, unprotected, ciphertext = oscore.CanUnprotect._uncompress(
        request.opt.oscore, request.payload
    )
    kid = unprotected.pop(oscore.COSE_KID, None)
    piv = unprotected.pop(oscore.COSE_PIV, None)
    if protected or unprotected or kid != ctx.recipient_id or piv is None:
        return None
    opened = open_request(ctx, kid, piv, ciphertext, request.code)
    if opened is None:
        return None
    plaintext, lean = opened
    admit(ctx, piv)
    inner = aiocoap.Message(code=plaintext[0])
    inner.payload = inner.opt.decode(plaintext[1:])
    inner.direction = Direction.INCOMING
    if request.opt.observe != 0:  # as aiocoap: only a registration keeps its Observe
        inner.opt.observe = None
    return inner, lean


def open_request(
    ctx: Any, kid: bytes, piv: bytes, ciphertext: bytes, code: Any
) -> tuple[bytes, LeanRequest] | None:
    """(plaintext, LeanRequest) of a request with key id `kid` and partial IV `piv` for
    `ctx`, decrypted but not yet admitted: `admit` strikes its sequence number out of the
    replay window once the caller takes it. None when aiocoap's full path must decide (a
    kid context; a replayed or unchecked sequence number). Raises
    oscore.ProtectionInvalid when it does not decrypt."""
    if ctx.id_context is not None:
        return None
    seqno = int.from_bytes(piv, "big")
    window = ctx.recipient_replay_window
    if not window.is_initialized() or not window.is_valid(seqno):
        return None  # aiocoap's path raises the ReplayError the site answers
    alg = ctx.alg_aead
    if len(ciphertext) < alg.tag_bytes + 1:  # +1: the inner code
        raise oscore.ProtectionInvalid("Ciphertext too short")
    request_id = oscore.RequestIdentifiers(kid, piv, True, code)
    aad = ctx.request_aad(kid, piv)  # `DeviceContext`'s: aiocoap's bytes, without cbor2
    nonce = ctx._construct_nonce(piv, kid, alg)
    plaintext = alg.decrypt(ciphertext, aad, ctx.recipient_key, nonce)
    return plaintext, LeanRequest(request_id, aad, nonce)


def admit(ctx: Any, piv: bytes) -> None:
    """Strike the request's sequence number out of `ctx`'s replay window."""
    ctx.recipient_replay_window.strike_out(int.from_bytes(piv, "big"))


def seal(ctx: Any, plaintext: bytes, lean: LeanRequest) -> bytes:
    """The ciphertext of the first answer to `lean`'s request, whose inner code, options
    and payload are `plaintext` (its AAD and nonce are the request's, RFC 8613 §8.3)."""
    lean.request_id.get_reusable_kid_and_piv()  # aiocoap's flag: this nonce is now used
    return ctx.alg_aead.encrypt(plaintext, lean.aad, ctx.sender_key, lean.nonce)


def protect(ctx: Any, answer: aiocoap.Message, lean: LeanRequest) -> aiocoap.Message:
    """The protected form of `answer`, the first answer to `lean`'s request: every option
    inside (a response's outer message carries none, as aiocoap's `_split_message`), the
    request's AAD and nonce, an empty OSCORE option (RFC 8613 §6.1). A later answer
    takes aiocoap's `protect`, with a sequence number of ours."""
    request_id = lean.request_id
    if not request_id.can_reuse_nonce:
        return ctx.protect(answer, request_id)[0]
    outer = aiocoap.Message(code=request_id.code_style.response)
    outer.direction = Direction.OUTGOING
    outer.transport_tuning = answer.transport_tuning
    outer.opt.oscore = b""
    outer.payload = seal(ctx, plaintext(answer), lean)
    return outer


def plaintext(answer: aiocoap.Message) -> bytes:
    """An answer's OSCORE plaintext: its code, every option, its payload (RFC 8613 §5.3)."""
    text = bytes([answer.code]) + answer.opt.encode()
    return text + b"\xff" + answer.payload if answer.payload else text
