"""The runtime's Prometheus metrics (names fixed by docs/architecture.md, prefix `ling_runtime_`).

Each server gets its own registry, so several servers in one test process never collide.
`num_queue_reqs` is the autoscaling signal the operator scrapes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class RuntimeMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        p = "ling_runtime_"

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(p + name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(p + name, doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(p + name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.num_queue_reqs = gauge("num_queue_reqs", "Requests waiting to be scheduled")
        self.num_running_reqs = gauge("num_running_reqs", "Requests in the running batch")
        self.kv_cache_usage_ratio = gauge("kv_cache_usage_ratio", "Fraction of MLA latent-KV pages reserved")
        self.linear_state_slots_used = gauge("linear_state_slots_used", "Linear-attention state slots in use")
        self.ranks_alive = gauge("ranks_alive", "Tensor-parallel ranks of this group that are alive")
        self.model_load_seconds = gauge("model_load_seconds", "Seconds to start the group and load weights")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token", _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between output tokens", _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency", _LATENCY_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens_total", "Prompt tokens processed (computed or cached)")
        # Prefix cache (engine/radix_cache.py). Computed = prompt_tokens_total - cached_prompt_tokens_total.
        self.cached_prompt_tokens = counter(
            "cached_prompt_tokens_total", "Prompt tokens served from the prefix cache (not recomputed)"
        )
        self.prefix_cache_hit_rate = gauge(
            "prefix_cache_hit_rate", "Cached / all prompt tokens of the requests admitted since start"
        )
        self.prefix_cache_evicted_pages = counter(
            "prefix_cache_evicted_pages_total", "MLA latent-KV pages evicted from the prefix cache"
        )
        self.prefix_cache_evicted_snapshots = counter(
            "prefix_cache_evicted_snapshots_total", "Lightning-state snapshots evicted from the prefix cache"
        )
        self.prefix_cache_pages = gauge("prefix_cache_pages", "MLA latent-KV pages held by the prefix cache")
        self.prefix_cache_snapshots = gauge(
            "prefix_cache_snapshots", "Lightning-state snapshot buffers in use (cached or being taken)"
        )
        self.generation_tokens = counter("generation_tokens_total", "Tokens generated")
        self.spec_draft_tokens = counter("spec_draft_tokens_total", "MTP draft tokens proposed")
        self.spec_accepted_tokens = counter("spec_accepted_tokens_total", "MTP draft tokens accepted")
        self.spec_accept_length = histogram(
            "spec_accept_length",
            "Tokens emitted per verify step (accepted drafts + 1)",
            (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0),
        )
        # The step loop's time (engine/engine.py): all of it while it steps, and the part that is
        # host work of its own (scheduling, plans, results), i.e. not in the executor's calls.
        self.engine_steps = counter("engine_steps_total", "Model steps the engine loop launched")
        self.engine_loop_seconds = counter(
            "engine_loop_seconds_total", "Seconds the engine loop spent stepping"
        )
        self.engine_host_seconds = counter(
            "engine_host_seconds_total", "Seconds of the engine loop's own host work (outside executor calls)"
        )
        self.requests_total = Counter(
            p + "requests_total", "Finished requests", ["model_name", "finish_reason"], registry=r
        )
        # Requests refused before generating: queue_full, queue_timeout, shutting_down,
        # engine_failed (the engine's refusals) and body_too_large (the HTTP layer's).
        self.requests_rejected_total = Counter(
            p + "requests_rejected_total",
            "Requests refused with a 413 or 503",
            ["model_name", "reason"],
            registry=r,
        )
        self.model_name = model_name

    def rejected(self, reason: str) -> None:
        self.requests_rejected_total.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
