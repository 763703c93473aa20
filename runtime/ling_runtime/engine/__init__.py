"""The engine: continuous-batching scheduler, cache accounting, sampling, MTP speculative decoding."""
