"""Serving benchmark: an OpenAI-API load generator (random, fixed-length and multi-turn agent
workloads; Poisson or fixed-concurrency arrivals) for ling-runtime, SGLang and vLLM servers."""
