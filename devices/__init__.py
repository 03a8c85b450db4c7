"""A device's credentials across the database and the broker, and the broker's admin side.

`provision` makes, rotates and revokes a meter's credentials (OSCORE context and AES key
in the database through `storage`, its account on the broker); `broker` creates the
broker's initial dynamic-security files and sends it live account commands; `address`
and `topics` are the broker URL, TLS and topic names everything that talks to the
broker shares. Used by the collector, the simulator, the commands and the stack
bootstrap; it imports none of them (import-linter holds that).
"""
