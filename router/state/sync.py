"""The (re)sync: the fleet's state read back from the store, at start and after an outage.

One script reads, in one atomic step, the stream's last id, every replica's
snapshot and the summed counters, so the snapshots match that stream
position, from which the stream is then followed. Before the snapshots, the
stream's recent entries give their placements (oldest to newest), so the
prefix index warms up as the peers' did. What was read goes to the `Inbox`.

Not here: the write link reopened and this replica's own snapshot sent
after it (`RedisState`), the stream entries that follow.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from router.state.inbox import Inbox

#: Reads, in one atomic step, the stream's last id, every replica's snapshot and the counters.
_SYNC_SCRIPT = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last_id = '0-0'
if #last > 0 then last_id = last[1][1] end
local snaps = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  table.insert(snaps, id)
  table.insert(snaps, redis.call('GET', ARGV[1] .. id) or '')
end
return {last_id, snaps, redis.call('HGETALL', KEYS[3])}
"""


async def read_back(
    client: aioredis.Redis,
    inbox: Inbox,
    *,
    stream: str,
    snapshots: str,
    replicas: str,
    vtc: str,
    warmup_entries: int,
) -> tuple[str, int]:
    """Apply the fleet's state as the store holds it to `inbox`.

    Returns:
        The stream id to follow from, and how many users' counters were read.
    """
    last_id, snaps, counters = await client.eval(_SYNC_SCRIPT, 3, stream, replicas, vtc, snapshots)
    last_id = last_id.decode() if isinstance(last_id, bytes) else last_id
    # Recent placements first (oldest to newest), so the index warms up as the peers' did.
    if warmup_entries and last_id != "0-0":
        recent = await client.xrevrange(stream, max=last_id, count=warmup_entries)
        for _, fields in reversed(recent):
            inbox.apply_placements(fields)
    inbox.replace_all(snaps)
    return last_id, inbox.add_counters(counters)
