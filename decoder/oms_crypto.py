"""OMS / EN 13757-7 payload encryption: security mode 5 (AES-128-CBC) and ELL AES-128-CTR.

Pure functions over bytes; keys are 16 raw bytes. Whether a decryption worked is
decided by the caller (plaintext must start with the 2F 2F idle fillers, or match the
ELL payload CRC), so nothing here raises for a wrong key.
"""

from __future__ import annotations

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BLOCK = 16
MODE5_CHECK = b"\x2f\x2f"  # OMS vol. 2: encrypted payload starts with two idle fillers


def mode5_iv(m_field: bytes, a_field: bytes, access_no: int) -> bytes:
    """OMS mode 5 IV: M(2) ‖ A(6: ID, version, device type) ‖ access number × 8."""
    return m_field + a_field + bytes([access_no & 0xFF]) * 8


def cbc_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES-128-CBC decrypt of whole blocks (`len(data) % 16 == 0`), no padding removed."""
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    return dec.update(data) + dec.finalize()


def cbc_encrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES-128-CBC encrypt of whole blocks; the caller pads with 2F fillers (OMS)."""
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return enc.update(data) + enc.finalize()


def ell_ctr(key: bytes, m_field: bytes, a_field: bytes, cc: int, sn: bytes, data: bytes) -> bytes:
    """EN 13757-4 ELL AES-128-CTR (both ways): IV = M ‖ A ‖ CC ‖ SN(4) ‖ FN(2)=0 ‖ BC=0."""
    iv = m_field + a_field + bytes([cc]) + sn + b"\x00\x00\x00"
    ctx = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return ctx.update(data) + ctx.finalize()


def pad_blocks(plain: bytes) -> bytes:
    """`plain` filled up to whole AES blocks with 2F idle fillers (EN 13757-3)."""
    return plain + b"\x2f" * (-len(plain) % BLOCK)


def des_cbc_decrypt(key8: bytes, data: bytes) -> bytes:
    """EN 13757-7 security mode 2 (deprecated): single DES-CBC, zero IV, whole 8-byte
    blocks. Single DES is 3DES with the same 8-byte key three times (K1 = K2 = K3)."""
    dec = Cipher(TripleDES(key8 * 3), modes.CBC(bytes(8))).decryptor()
    return dec.update(data) + dec.finalize()
