"""kvcache: the tiered KV block store (L1 local, L2 peers, L3 persistent) and its vLLM connector.

`kvcache.keys` is the vocabulary shared with the gateway: how a run of token ids
becomes a chain of block hashes. Everything else here is the store itself.
"""
