"""kvcache: the tiered KV block store (L1 local, L2 peers, L3 persistent) and its vLLM connector.

`kvcache.keys` is the vocabulary shared with the gateway: how a run of token ids
becomes a chain of block hashes, and the namespace that keeps incompatible
engines apart. Everything else here is the store itself:

- `framing`: the checked frame every stored block travels in;
- `tiers/` (`local`, `peer`, `redis`, `disk`) behind `tiers.base.Tier`, composed
  by `store.TieredStore`; `eviction/` (`lru`, `s3fifo`) for the byte budgets;
- L2: `ring` (placement), `membership/` (`static`, `redis`), `client`, `wire`,
  `server` (the cache node), `service` (its RPC handlers), `auth` (tokens,
  tenants), `uploads` (bounded reassembly of streamed frames), `handoff`
  (a leaving node's blocks) and `node` (``kvgate cache-node``);
- the vLLM side: `vllm_connector.TieredKVConnector`, with `transfer_plan`,
  `kv_pages`, `vllm_metrics` and `loop`;
- `settings`, `wiring` and `launch` for configuration and launchers.

See README.md in this directory for what each tier promises.
"""
