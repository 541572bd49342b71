"""The alert rules fire on the situations they name, and stay quiet otherwise (``promtool test rules``).

Each case feeds Prometheus's rule evaluator synthetic series (one sample a
minute) and states which alerts must be firing at a given time.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.support.prometheus import promtool

RULES = Path(__file__).resolve().parents[2] / "config" / "prometheus" / "rules.yml"

#: (series, values) fed in; a value string is promtool's expanding notation.
HEALTHY = [
    ('kvgate_pod_healthy{pod="http://a:8000"}', "1x30"),
    ('kvgate_pod_healthy{pod="http://b:8000"}', "1x30"),
    ("kvgate_admission_queue_length", "0x30"),
    ("kvgate_admission_queue_limit", "100x30"),
    ('kvgate_kvcache_tier_up{instance="e:1",tier="l3"}', "1x30"),
    ('kvgate_kvcache_checksum_failures_total{instance="e:1",tier="l2",reason="checksum"}', "0x30"),
    ('kvgate_predicted_prefix_hit_tokens_total{pod="http://a:8000"}', "0+600x30"),
    ('kvgate_prompt_tokens_total{pod="http://a:8000"}', "0+1000x30"),
    ('kvgate_engine_prefix_cache_hits_total{pod="http://a:8000"}', "0+580x30"),
    ('kvgate_engine_prefix_cache_queries_total{pod="http://a:8000"}', "0+1000x30"),
]


def _firing(name: str, **labels: str) -> dict:
    """An expected alert: its labels and its annotations with the labels filled in."""
    rule = next(r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if r["alert"] == name)
    fill = lambda text: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)  # noqa: E731
    return {
        "exp_labels": {**labels, **rule["labels"]},
        "exp_annotations": {key: fill(text) for key, text in rule["annotations"].items()},
    }


def _case(overrides: dict[str, str], at: str, firing: dict[str, list[dict[str, str]]]) -> dict:
    series = [{"series": name, "values": overrides.get(name, values)} for name, values in HEALTHY]
    series += [{"series": name, "values": values} for name, values in overrides.items() if name not in dict(HEALTHY)]
    names = ["KvgatePrefixHitRateFalling", "KvgatePodDown", "KvgateAdmissionQueueSaturated", "KvgateL3Unreachable", "KvgateChecksumFailures",
             "KvgateRouterAccuracyDrift", "KvgateEngineScrapeDown"]
    alerts = [{"eval_time": at, "alertname": name, "exp_alerts": firing.get(name, [])} for name in names]
    return {"interval": "1m", "input_series": series, "alert_rule_test": alerts}


def test_alert_rules_fire_on_their_situations(tmp_path: Path):
    tests = [
        _case({}, "20m", {}),  # a healthy fleet: nothing fires
        _case(
            {'kvgate_pod_healthy{pod="http://b:8000"}': "1x5 0x25"},
            "10m",
            {"KvgatePodDown": [_firing("KvgatePodDown", pod="http://b:8000")]},
        ),
        _case(
            {"kvgate_admission_queue_length": "0x5 95x25"},
            "15m",
            {"KvgateAdmissionQueueSaturated": [_firing("KvgateAdmissionQueueSaturated")]},
        ),
        _case(
            {'kvgate_kvcache_tier_up{instance="e:1",tier="l3"}': "1x5 0x25"},
            "10m",
            {"KvgateL3Unreachable": [_firing("KvgateL3Unreachable", instance="e:1")]},
        ),
        _case(
            {'kvgate_kvcache_checksum_failures_total{instance="e:1",tier="l2",reason="checksum"}': "0x5 3x25"},
            "8m",
            {"KvgateChecksumFailures": [_firing("KvgateChecksumFailures", instance="e:1", tier="l2")]},
        ),
        _case(  # the engines stop finding what the router predicts
            {'kvgate_engine_prefix_cache_hits_total{pod="http://a:8000"}': "0+580x5 2900+100x25"},
            "28m",
            {"KvgateRouterAccuracyDrift": [_firing("KvgateRouterAccuracyDrift")]},
        ),
        _case(  # the fleet's hit rate drops from 80% to 30%
            {
                'vllm:prefix_cache_queries_total{pod="http://a:8000"}': "0+1000x200",
                'vllm:prefix_cache_hits_total{pod="http://a:8000"}': "0+800x90 72300+300x110",
            },
            "130m",
            {"KvgatePrefixHitRateFalling": [_firing("KvgatePrefixHitRateFalling")]},
        ),
        _case(  # a steady 80%: quiet
            {
                'vllm:prefix_cache_queries_total{pod="http://a:8000"}': "0+1000x200",
                'vllm:prefix_cache_hits_total{pod="http://a:8000"}': "0+800x200",
            },
            "130m",
            {},
        ),
    ]
    path = tmp_path / "rules_test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
