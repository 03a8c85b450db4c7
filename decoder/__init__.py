"""Pure, vectorized decoders and encoders for NB-IoT meter payloads (no I/O)."""
