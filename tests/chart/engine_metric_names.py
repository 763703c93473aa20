"""The SGLang and vLLM metrics the chart's recording rules read, as the engines' source declares them.

Neither engine is installed here (each pulls torch and CUDA), so their names are kept as data: the
`name=` and type of each prometheus_client metric in the files below, copied from the source at the
commits named. `registry()` declares them in a real prometheus_client registry, so the exposed sample
names (`_total`, `_bucket`, `_sum`, `_count`) come out exactly as the engines expose them.

When an engine renames a metric, add the new name here (with its source) and a rule for it in
charts/ling-operator/templates/prometheusrule.yaml; keep the old name while releases still in use
export it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# sgl-project/sglang, python/sglang/srt/metrics/collector.py at 00ae9c1590d2d0bb6c0bfff39e312c34ae3dd538
# (SchedulerMetricsCollector and TokenizerMetricsCollector). Metrics need --enable-metrics, which the
# operator passes. Scheduler metrics carry model_name, engine_type, tp_rank, pp_rank (and moe_ep_rank);
# only attention-TP rank 0 of each DP rank logs them.
SGLANG_SOURCE = (
    "sgl-project/sglang python/sglang/srt/metrics/collector.py@00ae9c1590d2d0bb6c0bfff39e312c34ae3dd538"
)
SGLANG: dict[str, str] = {
    "sglang:num_running_reqs": "gauge",
    "sglang:num_queue_reqs": "gauge",
    "sglang:token_usage": "gauge",  # KV cache tokens used / max_total_num_tokens
    "sglang:mamba_usage": "gauge",  # linear-attention (mamba-style) state pool used / total
    "sglang:spec_accept_length": "gauge",  # per logged batch; 0 without speculative decoding
    "sglang:spec_accept_rate": "gauge",  # accepted / draft tokens of the logged batch
    "sglang:engine_load_weights_time": "gauge",
    "sglang:prompt_tokens_total": "counter",
    "sglang:generation_tokens_total": "counter",
    "sglang:time_to_first_token_seconds": "histogram",
    "sglang:inter_token_latency_seconds": "histogram",
    "sglang:e2e_request_latency_seconds": "histogram",
}
# Older SGLang releases exported time per output token under this name instead.
SGLANG_LEGACY: dict[str, str] = {"sglang:time_per_output_token_seconds": "histogram"}

# vllm-project/vllm, vllm/v1/metrics/loggers.py (PrometheusStatLogger; at 005a810bc40faa25b8870fbc8559c3462581eee3
# and the 0.11 version that adds inter_token_latency_seconds and marks time_per_output_token_seconds
# "Deprecated in 0.11"), vllm/v1/spec_decode/metrics.py@016a8587edb04ae53c913a1da9355a07dc0ca4ae
# (SpecDecodingProm), docs/design/metrics.md@f7e3a0879e633f9924d477b85a3775cb1ae2a2e5 (the v1 list).
# Labels: model_name, engine (the engine-core index under data parallelism).
VLLM_SOURCE = (
    "vllm-project/vllm vllm/v1/metrics/loggers.py, vllm/v1/spec_decode/metrics.py@016a8587, "
    "docs/design/metrics.md@f7e3a087"
)
VLLM: dict[str, str] = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",  # a fraction (0..1) despite the name
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:spec_decode_num_drafts": "counter",
    "vllm:spec_decode_num_draft_tokens": "counter",
    "vllm:spec_decode_num_accepted_tokens": "counter",
}
# Renamed, still exported by releases in use: gpu_cache_usage_perc (deprecated in 0.9 for
# kv_cache_usage_perc), time_per_output_token_seconds (deprecated in 0.11 for inter_token_latency_seconds;
# 0.11 exports both, with the same buckets).
VLLM_LEGACY: dict[str, str] = {
    "vllm:gpu_cache_usage_perc": "gauge",
    "vllm:time_per_output_token_seconds": "histogram",
}

# Default bucket bounds (seconds) of each engine's latency histograms, from the same files.
SGLANG_TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
VLLM_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
SGLANG_E2E_BUCKETS = (
    0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200, 1800, 2400,
)  # fmt: skip
VLLM_E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
)  # fmt: skip
# vLLM's inter-token (and time-per-output-token) bounds; SGLang's inter-token bounds.
VLLM_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
SGLANG_ITL_BUCKETS = (
    0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060, 0.080, 0.100,
    0.200, 0.400, 0.600, 0.800, 1.000, 2.000, 4.000, 6.000, 8.000,
)  # fmt: skip

ENGINES: dict[str, dict[str, str]] = {
    "sglang": {**SGLANG, **SGLANG_LEGACY},
    "vllm": {**VLLM, **VLLM_LEGACY},
}


def registry(engine: str) -> CollectorRegistry:
    """A registry holding `engine`'s metrics, declared the way its source declares them."""
    reg = CollectorRegistry()
    kinds = {"gauge": Gauge, "counter": Counter, "histogram": Histogram}
    for name, kind in ENGINES[engine].items():
        kinds[kind](name, name, ["model_name"], registry=reg)
    return reg
