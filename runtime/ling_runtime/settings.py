"""Every setting of one serving process, in one frozen type at the bottom of the runtime.

`Settings` holds the `serve` flags under SGLang's names and with their defaults (`cli.py` parses the
command line into it and checks flag combinations), then `resolve` fills in what the checkpoint
decides (its directory, the context length, the dtype). The same picklable object goes to every
tensor-parallel rank, the engine and the HTTP server, so no layer copies fields into a type of its
own. Pure Python: the operator's tests and `ling-runtime --help` import it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ling_runtime.config import LingConfig

DEFAULT_PORT = 30000
DEFAULT_DIST_PORT = 2345
DEFAULT_RAY_PORT = 6379
DTYPES = ("auto", "bfloat16", "bf16", "float16", "half", "float32", "float")
# "auto" (the CLI's default) becomes cuda or cpu when serving starts (server/launch.py).
DEVICES = ("auto", "cpu", "cuda")
TOOL_CALL_PARSERS = ("qwen25",)
SPEC_ALGORITHMS = ("NEXTN",)
MAMBA_SCHEDULER_STRATEGIES = ("auto", "no_buffer", "extra_buffer")
SCHEDULE_POLICIES = ("fcfs", "lpm")
LOAD_FORMATS = ("auto", "safetensors", "dummy")
# Lightning prefill works in chunks of this many tokens: prefix-cache snapshots sit on multiples of
# it, so a resumed prefill runs exactly the chunks a cold one runs (same arithmetic, same result).
LIGHTNING_CHUNK = 64
# The default KV budget when --max-total-tokens is left out: the context, and at least this much.
MIN_DEFAULT_TOTAL_TOKENS = 32768
MIN_DEFAULT_SNAPSHOTS = 32  # prefix-cache snapshot buffers when --max-mamba-snapshots is left out


@dataclass(frozen=True)
class DeviceDefaults:
    """Engine sizes that depend on the device when their flags are left out (as SGLang's do)."""

    max_running_requests: int
    chunked_prefill_size: int


# cpu: small steps keep streams responsive on a few cores. cuda: SGLang's values for H100/H200-class
# memory (8192-token prefill chunks: a 1K-8K prompt is one chunk, TTFT as the in-process prefill),
# and a running set (and graph buckets) that covers 128 concurrent streams.
DEVICE_DEFAULTS = {
    "cpu": DeviceDefaults(max_running_requests=64, chunked_prefill_size=256),
    "cuda": DeviceDefaults(max_running_requests=128, chunked_prefill_size=8192),
}


class SettingsError(ValueError):
    """A setting (flag) value or combination the runtime cannot honour; the message names the flag."""


@dataclass(frozen=True)
class Settings:
    # ---- the model and its text ------------------------------------------------------------------
    model_path: str | None = None  # None: the built-in tiny model
    served_model_name: str | None = None
    tokenizer_path: str | None = None
    dtype: str = "auto"
    quantization: str | None = None
    context_length: int | None = None  # None: the config's max_position_embeddings (see resolve)
    json_model_override_args: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False
    tool_call_parser: str | None = None
    # ---- parallelism and the group -------------------------------------------------------------
    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None
    launcher: str | None = None  # None until cli.validate: "ray" when nnodes > 1, else "mp"
    ray_port: int = DEFAULT_RAY_PORT
    ray_address: str | None = None
    ray_temp_dir: str | None = None
    rendezvous_timeout: float = 300.0
    device: str = "cpu"  # the CLI default "auto" is resolved by cli.validate (and launch, for direct use)
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int | None = None  # largest captured decode batch; None: the running limit
    disable_overlap_schedule: bool = False  # resolve each step before the next is scheduled
    # ---- engine sizes --------------------------------------------------------------------------
    max_running_requests: int | None = None  # None: the device's default (DEVICE_DEFAULTS)
    max_mamba_cache_size: int | None = None  # linear-state slots; None: max_running_requests
    max_total_tokens: int | None = None  # KV tokens; None: max(context, MIN_DEFAULT_TOTAL_TOKENS)
    chunked_prefill_size: int | None = None  # None: the device's default (DEVICE_DEFAULTS)
    page_size: int = 16
    mem_fraction_static: float | None = None
    mamba_scheduler_strategy: str = "auto"
    # ---- prefix cache (engine/radix_cache.py) and scheduling -------------------------------------
    disable_radix_cache: bool = False
    # Snapshot the Lightning states every this many tokens (SGLang's name; its default is 256, ours
    # 64 so that a 200-token shared prefix resumes at 192). A multiple of 64 and of --page-size.
    mamba_track_interval: int = LIGHTNING_CHUNK
    max_mamba_snapshots: int | None = None  # None: as many as the state slots, at least 32
    schedule_policy: str = "fcfs"
    load_format: str = "auto"
    max_queued_requests: int = 4096  # waiting requests beyond it get 503 + Retry-After
    queue_timeout: float | None = None  # seconds a request may wait for admission (None: no limit)
    speculative_algorithm: str | None = None
    speculative_num_steps: int = 0
    speculative_eagle_topk: int = 0
    speculative_num_draft_tokens: int = 0
    seed: int = 0
    # ---- HTTP ----------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    # From --api-key, --api-key-file or $LING_API_KEY (cli.validate); never in a repr or a log.
    api_key: str | None = field(default=None, repr=False)
    api_key_file: str | None = None
    max_request_body_bytes: int | None = None  # None: enough for the longest legal prompt (server)
    watchdog_timeout: float = 300.0  # a step running longer fails the engine and ends the process
    drain_timeout: float = 30.0  # SIGTERM: seconds running requests may take to finish
    log_level: str = "info"
    # ---- decided by the checkpoint (resolve) ---------------------------------------------------
    model_dir: str | None = None

    def resolve(self, model_dir: str) -> Settings:
        """These settings for the checkpoint in `model_dir`: context length and dtype filled in, TP
        size and MTP checked against its config (before any rank starts)."""
        config = LingConfig.from_hf(model_dir, self.json_model_override_args)
        config.validate_tp(self.tp_size)
        if self.speculative and config.num_nextn_predict_layers < 1:
            raise SettingsError(
                "--speculative-algorithm NEXTN: the checkpoint has no MTP layer (num_nextn_predict_layers=0)"
            )
        dtype = self.dtype
        if dtype == "auto":
            # CPU kernels want float32; on GPU follow the checkpoint (bf16 for Ling).
            on_gpu = "bfloat16" if config.torch_dtype == "float32" else config.torch_dtype
            dtype = "float32" if self.device == "cpu" else on_gpu
        if dtype not in DTYPES or dtype == "auto":
            raise SettingsError(f"--dtype {dtype}: accepted {sorted(set(DTYPES) - {'auto'})}")
        return replace(
            self,
            model_dir=model_dir,
            dtype=dtype,
            context_length=self.context_length or config.max_position_embeddings,
            max_running_requests=self.running_limit,
            chunked_prefill_size=self.prefill_chunk,
        )

    @property
    def speculative(self) -> bool:
        return self.speculative_algorithm is not None

    @property
    def num_draft_steps(self) -> int:
        """MTP draft tokens per step (k); 0: speculative decoding is off."""
        return self.speculative_num_steps if self.speculative else 0

    @property
    def device_defaults(self) -> DeviceDefaults:
        return DEVICE_DEFAULTS["cuda" if self.device == "cuda" else "cpu"]

    @property
    def running_limit(self) -> int:
        """--max-running-requests, or the device's default."""
        return self.max_running_requests or self.device_defaults.max_running_requests

    @property
    def prefill_chunk(self) -> int:
        """--chunked-prefill-size, or the device's default."""
        return self.chunked_prefill_size or self.device_defaults.chunked_prefill_size

    @property
    def graph_max_batch(self) -> int:
        """The largest captured decode batch: --cuda-graph-max-bs, or the running set's bound."""
        return min(self.cuda_graph_max_bs or self.running_limit, self.running_limit, self.num_slots)

    @property
    def num_slots(self) -> int:
        """Linear-attention state slots (--max-mamba-cache-size, default: the running-set bound)."""
        return self.max_mamba_cache_size or self.running_limit

    @property
    def prefix_cache(self) -> bool:
        """Whether finished prefixes are kept and reused (on by default, as in SGLang). `no_buffer`
        keeps no Lightning snapshots, and without a state to resume from a hybrid prefix is useless."""
        return not self.disable_radix_cache and self.mamba_scheduler_strategy != "no_buffer"

    @property
    def num_snapshots(self) -> int:
        """Lightning-state snapshot buffers of the prefix cache (0 when it is off)."""
        if not self.prefix_cache:
            return 0
        # Each holds every Lightning layer's state (Ling-2.6-flash: 28 x 32 x 128^2 fp32 = 58.7 MB
        # per TP shard), as a slot does: by default as many as the slots, and at least 32.
        return self.max_mamba_snapshots or max(self.num_slots, MIN_DEFAULT_SNAPSHOTS)

    @property
    def num_pages(self) -> int:
        """MLA latent-KV pages the engine hands out."""
        total = self.max_total_tokens or max(self.context_length or 0, MIN_DEFAULT_TOTAL_TOKENS)
        return -(-total // self.page_size)

    @property
    def cuda_graph(self) -> bool:
        return not self.disable_cuda_graph

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return self.model_path.rstrip("/") if self.model_path else "ling-tiny"

    @property
    def dist_host_port(self) -> tuple[str, int]:
        return split_host_port(self.dist_init_addr or f"127.0.0.1:{DEFAULT_DIST_PORT}", "--dist-init-addr")

    @property
    def shards_per_node(self) -> int:
        return self.tp_size // self.nnodes


def split_host_port(value: str, flag: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"{flag} {value!r}: expected HOST:PORT with a port in 1..65535")
    return host.strip("[]"), int(port)
