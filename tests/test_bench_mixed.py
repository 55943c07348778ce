"""The mixed-traffic benchmark's verdicts, on figures made up for the purpose (no model, no timing)."""
from atv_core.tools.bench_mixed import MIB, acceptance


def _run(wall, peak, requests, tokens=1000):
    return {"wall_s": wall, "peak_rss_bytes": peak, "run_peak_rss_bytes": peak, "long_tokens": tokens,
            "kv_bytes_per_token": 1024, "requests": requests}


def _short(gaps, ttft=0.5, reason="length"):
    return {"long": False, "ttft_s": ttft, "gaps_s": gaps, "finish_reason": reason}


def _long(ttft):
    return {"long": True, "ttft_s": ttft, "gaps_s": [0.1], "finish_reason": "length"}


def test_acceptance_reads_each_bound_from_the_issue():
    short = _run(10.0, 1000 * MIB, [_short([0.1] * 99 + [1.0]) for _ in range(3)])
    alone = _run(5.0, 1100 * MIB, [_long(4.0)])
    good = _run(20.0, 1200 * MIB, [_long(15.0)] + [_short([0.12] * 99 + [1.5]) for _ in range(3)])
    verdict = acceptance({"short": short, "mixed": good, "long": alone})
    assert verdict["long_ttft_bound_s"] == 16.0 and verdict["long_kv_mib"] == 1000 / 1024
    assert abs(verdict["itl_median_ratio"] - 1.2) < 1e-9 and abs(verdict["itl_p99_ratio"] - 1.5) < 1e-9
    assert all(verdict["pass"].values())
    bad = _run(20.0, 1400 * MIB, [_long(17.0)] + [_short([0.2] * 100, reason="error")])
    verdict = acceptance({"short": short, "mixed": bad, "long": alone})
    assert not any(verdict["pass"][k] for k in ("process_peak_rss_ratio<=1.3", "itl_median_ratio<=1.3",
                                                "long_ttft<=short_wall+1.5*alone", "no_failures"))
    assert verdict["failures"] == 1 and verdict["pass"]["itl_p99_ratio<=2"]
