"""Screenshots of kvgate's dashboards under real traffic, for the README.

    python scripts/dashboard_screenshots.py [--gateway URL --engines URL,URL --cache-nodes URL,URL]
                                            [--seconds 90] [--out docs/dashboards]

Drives chat traffic (several users, shared system prompts, multi-turn
follow-ups) through a gateway while a real Prometheus (Debian's package)
scrapes the gateway and the engines, then writes:

- ``live.png``: the gateway's own ``/dashboard`` page, in headless Chromium;
- ``grafana-<board>.png``: each Grafana dashboard's panels drawn with
  matplotlib from Prometheus's answers to the panels' own queries
  (``query_range`` over the run). Grafana itself is not packaged for this
  machine's registries, so this is a faithful re-drawing of the same queries
  and data, not Grafana's renderer.

With ``--gateway`` it uses a running fleet (e.g. ``kvgate up``; engine URLs
are scraped directly); without, it starts two stub engines and a gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvgate.dashboards import BOARDS  # noqa: E402
from tests.support.dashboards import substitute  # noqa: E402
from tests.support.prometheus import run_prometheus  # noqa: E402

SYSTEMS = [
    "You are a meticulous travel planner. Answer with a short itinerary. " * 8,
    "You are a code reviewer for a Python web service. Point out bugs first. " * 8,
    "You are a patient maths tutor. Explain each step of your reasoning. " * 8,
]
USERS = ["alice", "bob", "carol", "dave"]


async def traffic(gateway: str, model: str, seconds: float, concurrency: int = 6) -> int:
    """Multi-turn chats for `seconds`; returns the number of answers."""
    done = 0
    deadline = time.monotonic() + seconds
    rng = random.Random(7)

    async def worker(http: aiohttp.ClientSession, index: int) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            user = USERS[index % len(USERS)] if rng.random() < 0.8 else USERS[0]
            messages = [{"role": "system", "content": rng.choice(SYSTEMS)}]
            for turn in range(rng.randint(1, 4)):
                messages.append({"role": "user", "content": f"Turn {turn}: question {rng.randint(0, 30)} please."})
                body = {"model": model, "messages": messages, "max_tokens": 8, "stream": rng.random() < 0.5}
                async with http.post(f"{gateway}/v1/chat/completions", json=body, headers={"x-user-id": user}) as r:
                    await r.read()
                    done += r.status == 200
                messages.append({"role": "assistant", "content": "Noted. " * 4})

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        await asyncio.gather(*(worker(http, i) for i in range(concurrency)))
    return done


async def screenshot_live(gateway: str, path: Path) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = await browser.new_page(viewport={"width": 1500, "height": 1250})
        await page.goto(f"{gateway}/dashboard")
        await page.wait_for_selector("#decisions .decision")
        await asyncio.sleep(2.5)  # two more polls: charts drawn at full width
        await page.screenshot(path=str(path), full_page=True)
        await browser.close()


def _legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip() or "value"


def render_board(prom, board: dict, start: float, end: float, path: Path, rate_window: str) -> None:
    """Draw every panel of `board` from Prometheus's range answers to its queries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    panels = [p for p in board["panels"] if p["type"] != "row"]
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    plt.style.use("dark_background")
    fig, axes = plt.subplots(rows, cols, figsize=(18, 3.3 * rows), squeeze=False)
    fig.patch.set_facecolor("#111217")
    fig.suptitle(f"{board['title']}  (queries run on Prometheus; drawn with matplotlib)", x=0.01, ha="left", fontsize=13)
    step = max(1, int((end - start) / 200))
    for ax, panel in zip(axes.flat, panels):
        ax.set_facecolor("#181b1f")
        ax.set_title(panel["title"], loc="left", fontsize=10)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit") or panel.get("format")
        for target in panel.get("targets", []):
            expr = substitute(target["expr"], rate_window)
            data = prom.api("/api/v1/query_range", query=expr, start=str(start), end=str(end), step=f"{step}s")
            results = data["result"][:8]
            for n, series in enumerate(results):
                xs = [float(t) - end for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                if panel["type"] == "stat":
                    finite = [y for y in ys if y == y]
                    value = finite[-1] if finite else float("nan")
                    text = f"{100 * value:.1f}%" if unit == "percentunit" else f"{value:.3g}"
                    label = _legend(target.get("legendFormat", ""), series["metric"]) if len(results) > 1 else ""
                    y = 0.5 + 0.25 * ((len(results) - 1) / 2 - n)
                    ax.text(0.5, y, f"{label}  {text}".strip(), fontsize=28 if len(results) == 1 else 18,
                            ha="center", va="center", transform=ax.transAxes, color="#73bf69")
                else:
                    ax.plot(xs, ys, linewidth=1.4, label=_legend(target.get("legendFormat", ""), series["metric"]))
        if panel["type"] == "stat":
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            if unit == "percentunit":
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:.0f}%"))
            ax.set_xlabel("seconds before the end of the run", fontsize=8)
            handles, labels = ax.get_legend_handles_labels()
            if handles:
                ax.legend(fontsize=7, loc="upper left", framealpha=0.3)
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="#888")
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.15)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=80, facecolor=fig.get_facecolor())
    plt.close(fig)


async def run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as stack:
        if args.gateway:
            gateway, engines = args.gateway.rstrip("/"), [u for u in args.engines.split(",") if u]
        else:
            from kvgate.stub_engine import StubBehaviour, StubEngine, run_app, run_stub
            from router.app import RUNNER_OPTIONS, create_app
            from router.discovery import StaticDiscovery
            from router.settings import Settings

            stubs = [
                await stack.enter_async_context(run_stub(StubEngine(behaviour=StubBehaviour(delay_s=0.03, chunk_delay_s=0.005))))
                for _ in range(2)
            ]
            settings = Settings()
            settings.scrape.interval_s = 0.5
            settings.admission.max_inflight_per_pod = 3
            app = create_app(settings, discovery=StaticDiscovery([s.url for s in stubs]))
            gateway = await stack.enter_async_context(run_app(app, **RUNNER_OPTIONS))
            engines = [s.url for s in stubs]
            await asyncio.sleep(1.0)
        jobs = {"kvgate-gateway": [gateway.removeprefix("http://")], "vllm": [e.removeprefix("http://") for e in engines]}
        if args.cache_nodes:
            jobs["kvgate-cache-node"] = [u.removeprefix("http://").removesuffix("/metrics") for u in args.cache_nodes.split(",")]
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        prom = await asyncio.to_thread(stack.enter_context, run_prometheus(workdir, jobs, relabel_pod=["vllm"]))
        start = time.time()

        async def shoot_while_busy() -> None:
            await asyncio.sleep(max(args.seconds - 25.0, 1.0))
            await screenshot_live(gateway, args.out / "live.png")

        answered, _ = await asyncio.gather(traffic(gateway, args.model, args.seconds), shoot_while_busy())
        print(f"{answered} answers in {args.seconds:.0f}s", file=sys.stderr)
        await asyncio.sleep(2)
        end = time.time()
        for name, build in BOARDS.items():
            if name in args.boards:
                path = args.out / f"grafana-{name.removesuffix('.json')}.png"
                await asyncio.to_thread(render_board, prom, build(), start, end, path, "10s")
                print(f"wrote {path}", file=sys.stderr)
    print(f"wrote {args.out / 'live.png'}", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", help="a running gateway (default: start stub engines and a gateway)")
    parser.add_argument("--engines", default="", help="comma-separated engine URLs to scrape (with --gateway)")
    parser.add_argument("--cache-nodes", default="", help="comma-separated cache-node metrics URLs (kvgate up prints them)")
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--seconds", type=float, default=60.0, help="traffic duration")
    parser.add_argument("--boards", default="fleet.json,routing.json", help="dashboards to draw")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboards")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
