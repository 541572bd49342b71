from __future__ import annotations

CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


async def test_chat_round_trip(cluster):
    async with await cluster.post("/v1/chat/completions", CHAT) as r:
        body = await r.json()
        assert r.status == 200, body
        assert body["choices"][0]["message"]["content"] == "tok tok tok "
        assert r.headers["x-kvgate-pod"] in {e.url for e in cluster.engines}
