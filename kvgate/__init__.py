"""kvgate: the composition root.

The `kvgate` command and the local cluster live here; they wire the gateway
(`router`), the KV store (`kvcache`) and real vLLM engines together. Nothing
below imports this package.
"""
