"""Compiled decoding: options, the KV-cache forward pass, sampling and the decode loop."""
