"""Per-GPU peak-memory estimate of a training run, before anything is loaded: pure functions of the model sizes
(`RWKV6Config`), the run's settings (`TrainConfig`) and the world size, returning a `MemoryEstimate` (its
`table()` is what `python train.py ... --dry_run` prints).

The components, per rank:
- weights: the module's parameters. `--strategy auto/ddp`: frozen base in the --precision dtype (fp32 for
  --peft none), trainable tensors fp32. DeepSpeed: every parameter in the --precision dtype (the bf16 module
  copy), partitioned over the ranks under ZeRO-3 (and moved to host RAM by ZeRO-3 offload). A quantised base
  (--quant, or `quant`: "int8" | "nf4") holds the frozen projection weights at 1 byte + an fp32 scale per output
  row, or 0.5 byte + an fp32 absmax per 64 weights.
- gradients: fp32 for auto/ddp (plus DDP's bucket copies with several ranks); under DeepSpeed the fp32
  accumulation buffer (ZeRO-1 with bf16) or the fp32 gradient partition (ZeRO-2/3).
- optimizer states: AdamW's two fp32 moments; DeepSpeed adds the fp32 master copy; ZeRO-1/2/3 partition all
  three over the ranks; offload moves them to host RAM.
- framework buffers: DeepSpeed's gradient reduction buckets (Lightning's reduce_bucket_size 2e8 elements, double
  buffered with overlap_comm under ZeRO-1/2).
- activations: the tensors autograd saves for backward, counted tensor by tensor from the forward of
  src/rwkv6.py per block and token (`_layer_bytes_per_token`; the WKV operator's own by backend: the chunked
  torch backend keeps ~30 fp32 values per channel and token, the CUDA kernel its four bf16 inputs); with
  --grad_cp 1 only each block's input, and one block recomputed at a time ("block recompute"); with --chunk_ctx
  one chunk's, plus the states at every chunk boundary ("WKV state").
- logits: what the head and the loss save (the fp32 log-softmax, the logits for L2Wrap), B·T·V each or
  B·head_chunk·V with --head_chunk; "logits gradient": the two fp32 gradients formed in the loss backward.
- block backward: the gradients formed inside one block's backward; dense weight copy: a dequantised (or Bone-col
  rebuilt) projection weight.

The peak is the larger of two moments of backward: the loss backward (weights, states, every saved tensor, the
logits and their gradient) and a block's backward (saved tensors, gradients, the block's own workspace). The
estimate is compared with measured peaks in tests/training/test_memory.py (CPU, tiny models, fp32 and bf16:
saved tensors within 2%, step peaks within 10%) and on a GPU by the GPU check's train and deepspeed sections
(torch.cuda.max_memory_allocated). The CUDA context (~0.5 GiB) and the caching allocator's slack are not in the
peak; `device_total` adds them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from src.adapters.config import AdapterConfig
from src.adapters.inject import inject_adapters
from src.config import TrainConfig
from src.rwkv6 import RWKV6, RWKV6Config

GiB = 1 << 30
QUANTS = ("int8", "nf4")
NF4_BLOCK = 64  # nf4: one fp32 absmax per 64 weights (bitsandbytes blocksize 64, no double quantisation)
DS_BUCKET = 200_000_000  # Lightning's DeepSpeedStrategy reduce_bucket_size (elements)
CUDA_CONTEXT = 512 << 20  # CUDA context and kernels: outside torch's allocator (not in max_memory_allocated)
ALLOCATOR_SLACK = 0.10  # the caching allocator reserves about this much more than it hands out
PROCESS_RAM = 2 * GiB  # host RAM of one training process before any tensor (Python, torch, CUDA libraries)
WORKSPACE = 0.25  # gradients formed inside one block's backward, as a share of its saved tensors (CPU: 12-18%)
WKV_CHUNK = 32  # the torch backend's chunk length (src/wkv.py _MAX_CHUNK)
PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}  # bytes of a value per --precision
_PROJECTIONS = ("att.receptance", "att.key", "att.value", "att.gate", "att.output", "ffn.key", "ffn.receptance",
                "ffn.value")


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of the model with the adapter injected (from a meta-device model: no memory)."""

    frozen_projection: int  # the 8 block projections' frozen weights (what a quantised base quantises)
    projection_rows: int  # their output rows (int8 keeps one fp32 scale per row)
    frozen_other: int  # every other frozen tensor (embedding, head, norms, time_*; PiSSA's A0/B0)
    trainable: int
    trainable_outside_blocks: int  # embedding, final norm, head (full training, --train_parts ln)
    trainable_head: int  # head.weight when it trains (its gradient forms during the loss backward)
    largest_projection: int  # out x in of the largest projection (a dense copy of it is a transient)


@dataclass
class MemoryEstimate:
    """Bytes per rank. `rows` are the components of device memory; the peak is the sum of `peak_terms`, the
    components alive in the backward phase (`phase`) that needs the most: the loss backward (logits and their
    gradient on top of every saved tensor) or a block's backward (with grad_cp: its recompute). `host_rows` are
    host RAM per machine."""

    setting: str
    rows: dict[str, int]
    row_notes: dict[str, str]
    peak_terms: list[str]
    phase: str
    host_rows: dict[str, int]
    host_notes: dict[str, str]
    params: ParamCounts
    on_gpu: bool
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        """The estimated peak of allocated device memory of one rank (torch.cuda.max_memory_allocated)."""
        return sum(self.rows[k] for k in self.peak_terms)

    @property
    def device_total(self) -> int:
        """What the card must hold: the peak, the allocator's slack and the CUDA context."""
        return int(self.peak * (1 + ALLOCATOR_SLACK)) + (CUDA_CONTEXT if self.on_gpu else 0)

    @property
    def host_total(self) -> int:
        return sum(self.host_rows.values())

    def table(self) -> str:
        """The estimate as a readable table: every component, which are in the peak (*), the peak."""
        where = "per GPU" if self.on_gpu else "per process (on the CPU: host RAM)"
        width = max(len(k) for k in (*self.rows, *self.host_rows, "peak allocated"))
        lines = [f"memory estimate {where}: {self.setting}"]
        for name, value in self.rows.items():
            mark = "*" if name in self.peak_terms else " "
            lines.append(f" {mark}{name:<{width}}  {gib(value):>10}  {self.row_notes.get(name, '')}".rstrip())
        lines.append(f"  {'-' * width}  {'-' * 10}")
        lines.append(f"  {'peak allocated':<{width}}  {gib(self.peak):>10}  the rows marked *, in {self.phase}"
                     + ("; compare torch.cuda.max_memory_allocated()" if self.on_gpu else ""))
        if self.on_gpu:
            lines.append(f"  {'card needs':<{width}}  {gib(self.device_total):>10}  + {ALLOCATOR_SLACK:.0%} allocator "
                         f"slack + {CUDA_CONTEXT >> 20} MiB CUDA context")
        lines.append("host RAM per machine:")
        for name, value in self.host_rows.items():
            lines.append(f"  {name:<{width}}  {gib(value):>10}  {self.host_notes.get(name, '')}".rstrip())
        lines.append(f"  {'host total':<{width}}  {gib(self.host_total):>10}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def count_parameters(model_cfg: RWKV6Config, adapter: AdapterConfig) -> ParamCounts:
    """ParamCounts of `adapter` injected into a model of `model_cfg`, built on the meta device."""
    with torch.device("meta"):
        model = RWKV6(model_cfg)
    inject_adapters(model, adapter)
    projection = rows = other = trainable = outside = head = largest = 0
    projection_weights = {f"blocks.{i}.{p}.weight" for i in range(model_cfg.n_layer) for p in _PROJECTIONS}
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable += p.numel()
            outside += 0 if name.startswith("blocks.") else p.numel()
            head += p.numel() if name == "head.weight" else 0
        elif name in projection_weights:
            projection += p.numel()
            rows += p.shape[0]
            largest = max(largest, p.numel())
        else:
            other += p.numel()
    other += sum(b.numel() for b in model.buffers())
    if adapter.method == "none":
        largest = max(p.numel() for n, p in model.named_parameters() if n in projection_weights)
    return ParamCounts(projection, rows, other, trainable, outside, head, largest)


def quant_bytes(quant: str | None, weights: int, rows: int) -> float:
    """Bytes of `weights` frozen projection weights (with `rows` output rows) held quantised."""
    if quant == "int8":
        return weights * 1.0 + rows * 4.0
    if quant == "nf4":
        return weights * 0.5 + weights / NF4_BLOCK * 4.0
    raise ValueError(f"quant {quant!r}: use None, {' or '.join(QUANTS)}")


@dataclass(frozen=True)
class _Mode:
    """Byte sizes of the tensors the forward saves, by role."""

    stream: int  # residual stream, LayerNorm outputs and the token-mixing tensors derived from them
    lin: int  # outputs of the projections (and what is computed from them: silu, relu², sigmoid, logits)
    lin_in: int  # the input a plain linear (LoRA's A, a trained base weight) saves: an autocast copy or the input
    norm: int  # GroupNorm (ln_x) input and output


def _mode(cfg: TrainConfig, on_gpu: bool) -> _Mode:
    half = PRECISION_BYTES[cfg.precision]
    if cfg.precision == "fp32":
        return _Mode(4, 4, 4, 4)
    if cfg.strategy_spec.deepspeed:
        return _Mode(half, half, half, half)  # everything in bf16/fp16, no autocast
    if not on_gpu:
        # CPU autocast keeps LayerNorm in the base's dtype: with a bf16 base it saves what DeepSpeed's pure bf16
        # run saves; a full-training (fp32) base keeps the stream in fp32 (measured)
        stream = 4 if cfg.adapter.method == "none" else half
        return _Mode(stream, half, half, stream)
    # CUDA autocast: LayerNorm and GroupNorm run in fp32, so the stream and the mixing tensors are fp32; the
    # projections' outputs are bf16, and a plain linear saves a bf16 copy of its input.
    return _Mode(4, half, half, 4)


def _adapted(adapter: AdapterConfig) -> set[str]:
    if adapter.method == "none":
        return set(_PROJECTIONS)
    if adapter.method == "state":
        return set()
    return set(adapter.projections())


def _layer_bytes_per_token(mcfg: RWKV6Config, adapter: AdapterConfig, m: _Mode, first: bool, backend: str,
                           t_pad: int, t: int) -> float:
    """Bytes autograd saves in one block per token (sequence length t, the WKV torch backend padding it to
    t_pad). `first`: block 0, where nothing before the projections needs a gradient unless base tensors train.

    Counted from src/rwkv6.py's forward (what each op keeps for backward, when its inputs need gradients)."""
    C, A, Fd, H, N = mcfg.n_embd, mcfg.dim_att, mcfg.dim_ffn, mcfg.n_head, mcfg.head_size
    adapted = _adapted(adapter)
    full = adapter.method == "none"
    trains_time = full or "time" in adapter.train_parts
    trains_base = full or bool(adapter.train_parts)
    grad_stream = not first or trains_base  # does the block's input need a gradient?
    lora = adapter.method in ("lora", "pissa")

    def saved_input(name: str, dim: int, dtype_bytes: int) -> float:
        """What the projection `name` keeps of its input (dim values per token, held in dtype_bytes)."""
        if name not in adapted:
            return 0.0
        if lora or full:  # F.linear saves the (autocast-cast) input; LoRA also its r-wide hidden
            extra = adapter.lora_r * m.lin if lora else 0.0
            if lora and adapter.lora_dropout > 0:
                extra += dim * (dtype_bytes + 1)  # dropout output and mask
            return dim * (m.lin_in if dtype_bytes == 4 and m.lin_in != 4 else dtype_bytes) + extra
        return dim * dtype_bytes  # Bone saves x as given

    b = 0.0
    # time mix
    if grad_stream:
        b += (C + 2) * m.stream  # ln1 input and its mean/rstd
        b += C * m.stream + 5 * C * m.lin  # xx, and maa_* + m* (the data-dependent mixes) saved by the 5 products
        b += 5 * mcfg.d_mix * m.lin + mcfg.d_decay * m.lin  # tanh outputs of the two low-rank mixers
        if trains_time:
            b += 2 * C * m.stream  # inputs of the two w1 matmuls
    b += sum(saved_input(f"att.{p}", C, m.stream) for p in ("receptance", "key", "value", "gate"))
    rkv = grad_stream or bool({"att.receptance", "att.key", "att.value"} & adapted)
    state = adapter.method == "state" or "state" in adapter.train_parts
    level = "w" if grad_stream else "rkv" if rkv else "state" if state else None  # what WKV needs gradients for
    gate = grad_stream or "att.gate" in adapted
    if gate:
        b += A * m.lin  # silu input
    b += _wkv_bytes_per_token(A, H, N, backend, level, t_pad, t)
    if level is not None:
        b += A * m.norm + 2 * H * m.norm  # ln_x input and its statistics
        b += A * m.lin  # g, kept by y * g for y's gradient
    if gate:
        b += A * m.norm  # y (normalised), kept by y * g for g's gradient
    b += saved_input("att.output", A, m.norm)
    # the residual x + dx needs a gradient from here on
    b += (C + 2) * m.stream  # ln2 input and statistics
    # channel mix
    if trains_time:
        b += C * m.stream  # xx, saved by the products with the trained maa_k / maa_r
    b += saved_input("ffn.key", C, m.stream) + saved_input("ffn.receptance", C, m.stream)
    b += Fd * m.lin  # relu output (kept by relu and by the square)
    b += saved_input("ffn.value", Fd, m.lin)
    b += 2 * C * m.lin  # sigmoid output and the value projection's output, saved by their product
    return b


def _wkv_bytes_per_token(A: int, H: int, N: int, backend: str, level: str | None, t_pad: int, t: int) -> float:
    """What the WKV operator keeps per token (its inputs' copies and internals). level: "w" when the decay needs
    a gradient (every block after the first), "rkv" when only r, k, v do, "state" when only the initial state
    does (state tuning's first block), None when nothing does.

    torch backend (src/wkv.py, chunk L = 32 tokens, n = log2 L halving levels), fitted to saved-tensor counts
    of the operator on CPU (within 2% for L = 32): per channel and padded token, fp32 values (4 + 4n) + 2N/L +
    L/N at "w" (plus the fp32 decay it clamps), (2 + 3n) + N/L + L/N at "rkv", 1 + 1/L at "state". The CUDA
    kernel keeps its four bf16 inputs (the same tensors when they are bf16); fla is taken as the kernel's inputs
    plus fp32 decays and chunk states (not measured)."""
    if level is None:
        return 0.0
    if backend == "torch":
        L = min(WKV_CHUNK, 1 << max(t - 1, 0).bit_length())
        n = L.bit_length() - 1
        per = {"w": 4 * ((4 + 4 * n) + 2 * N / L + L / N) + 4, "rkv": 4 * ((2 + 3 * n) + N / L + L / N),
               "state": 4 * (1 + 1 / L)}[level]
        return A * per * t_pad / t
    if backend == "cuda":
        return A * 4 * 2.0
    return A * (3 * 2.0 + 2 * 4.0 + 4.0 * N / 64)  # fla: r, k, v bf16, the fp32 log-decay (and its input), states


def resolved_backend(cfg: TrainConfig, on_gpu: bool) -> str:
    """The WKV backend the estimate assumes: the configured one, or under auto the CUDA kernel on a GPU and the
    torch backend on CPU."""
    if cfg.wkv_backend != "auto":
        return cfg.wkv_backend
    return "cuda" if on_gpu else "torch"


@dataclass(frozen=True)
class _Dynamic:
    """What one sequence of T tokens (one chunk) adds, in bytes: `kept` is what stays saved while the loss
    backward runs (every block's saved tensors, or with grad_cp only their inputs, plus the final norm's), the
    others as in the table of `MemoryEstimate`."""

    kept: float
    head: float  # the final LayerNorm's saved input (freed once the loss backward is done)
    logits: float
    logits_grad: float
    block: float  # one block's saved tensors (the largest block)
    recompute: float  # with grad_cp: one block recomputed in backward; 0 without
    workspace: float  # gradients formed while one block's backward runs


def _dynamic(mcfg: RWKV6Config, cfg: TrainConfig, adapter: AdapterConfig, m: _Mode, backend: str, B: int,
             T: int, grad_cp: bool, carried_state: bool) -> _Dynamic:
    """carried_state: the chunk starts from a state that needs a gradient (--chunk_ctx, any chunk but the
    first), so block 0 saves as much as the others."""
    L, C, V = mcfg.n_layer, mcfg.n_embd, mcfg.vocab_size
    chunk = min(WKV_CHUNK, 1 << max(T - 1, 0).bit_length())
    t_pad = -(-T // chunk) * chunk
    tokens = B * T
    first = _layer_bytes_per_token(mcfg, adapter, m, not carried_state, backend, t_pad, T) * tokens
    other = _layer_bytes_per_token(mcfg, adapter, m, False, backend, t_pad, T) * tokens
    block = max(first, other)
    head_tokens = B * (min(cfg.head_chunk, T) if cfg.head_chunk else T)
    head = (C + 2) * m.stream * tokens  # ln_out's input and statistics
    if adapter.method == "none":
        head += C * m.lin_in * tokens  # the head's input, for its weight gradient
    elif cfg.head_chunk and cfg.head_chunk < T:
        head += C * m.stream * tokens  # ln_out's output, kept for the checkpointed head pieces
    l2 = m.lin if cfg.l2wrap else 0
    logits = (4 + l2) * V * head_tokens  # fp32 log-softmax (cross-entropy), the logits L2Wrap keeps
    logits_grad = 8 * V * head_tokens  # the gradients of the log-softmax and of the fp32 logits (measured)
    kept = L * tokens * C * m.stream if grad_cp else first + (L - 1) * other
    return _Dynamic(kept=kept, head=head, logits=logits, logits_grad=logits_grad, block=block,
                    recompute=block if grad_cp else 0.0, workspace=WORKSPACE * block)


def estimate_memory(mcfg: RWKV6Config, cfg: TrainConfig, world_size: int | None = None, *, on_gpu: bool = True,
                    wkv_backend: str | None = None, quant: str | None = None,
                    checkpoint_bytes: int | None = None) -> MemoryEstimate:
    """The per-rank memory of training `mcfg` with `cfg` on `world_size` ranks (default --devices x --num_nodes).

    on_gpu: whether the model trains on a CUDA GPU (decides the autocast pattern; on CPU the device rows are host
    RAM). wkv_backend: the backend that will run (default: see `resolved_backend`). quant: "int8" or "nf4" for
    the frozen projection weights (default: --quant). checkpoint_bytes: size of the --load_model file (host RAM to
    load it; default the base's size in bf16)."""
    if quant is None and getattr(cfg, "quant", "none") != "none":
        quant = cfg.quant
    if quant is not None and quant not in QUANTS:
        raise ValueError(f"quant {quant!r}: use None, {' or '.join(QUANTS)}")
    world = world_size or cfg.devices * cfg.num_nodes
    spec = cfg.strategy_spec
    adapter = cfg.adapter
    counts = count_parameters(mcfg, adapter)
    m = _mode(cfg, on_gpu)
    backend = wkv_backend or resolved_backend(cfg, on_gpu)
    prec = PRECISION_BYTES[cfg.precision]
    P = counts.trainable
    rows: dict[str, float] = {}
    notes: dict[str, str] = {}
    host: dict[str, float] = {}
    host_notes: dict[str, str] = {}
    extra: list[str] = []
    local = _ranks_per_node(cfg, world)

    # weights
    base_bytes = prec if spec.deepspeed or adapter.method != "none" else 4
    train_bytes = prec if spec.deepspeed else 4
    projection = (quant_bytes(quant, counts.frozen_projection, counts.projection_rows) if quant
                  else counts.frozen_projection * base_bytes)
    weights = projection + counts.frozen_other * base_bytes + P * train_bytes
    notes["weights"] = (f"{_short(counts.frozen_projection + counts.frozen_other)} frozen "
                        f"({'projections ' + quant + ', the rest ' if quant else ''}{_dtype_name(base_bytes)}) + "
                        f"{_short(P)} trainable ({_dtype_name(train_bytes)}{' module copy' if spec.deepspeed else ''})")
    if spec.stage == 3:
        gathered = 2 * (counts.frozen_projection + P) / mcfg.n_layer * prec  # the block in use and the next
        if spec.offload:
            host["ZeRO-3 offloaded parameters"] = weights / world * local
            host_notes["ZeRO-3 offloaded parameters"] = "this machine's ranks' parameter partitions"
            weights, notes["weights"] = 0.0, "in host RAM (ZeRO-3 offload), gathered block by block"
        else:
            weights /= world
            notes["weights"] += f", 1/{world} per rank (ZeRO-3)"
        rows["weights"] = weights
        rows["ZeRO-3 gathered blocks"] = gathered
        notes["ZeRO-3 gathered blocks"] = "full parameters of the block in use and of the prefetched next one"
    else:
        rows["weights"] = weights

    # gradients, optimizer states, framework buffers
    if spec.deepspeed:
        if spec.stage == 1 and cfg.precision == "bf16":  # DeepSpeed's BF16_Optimizer
            grads, notes["gradients"] = P * (4 + prec), "fp32 accumulation buffer (not partitioned) + bf16 gradients"
        else:
            grads, notes["gradients"] = P * 4 / world, f"fp32 gradient partition (1/{world} per rank)"
            if spec.stage in (1, 2):
                accum = 4 if spec.stage == 1 else prec  # ZeRO-1 accumulates in fp32 inside its buckets
                rows["framework buffers"] = 2 * DS_BUCKET * accum
                notes["framework buffers"] = (f"DeepSpeed reduce buckets: 2 x {DS_BUCKET:.0e} elements "
                                              f"{_dtype_name(accum)} (Lightning's reduce_bucket_size, overlap_comm)")
            else:
                rows["framework buffers"] = DS_BUCKET * prec
                notes["framework buffers"] = f"DeepSpeed ZeRO-3 reduce bucket: {DS_BUCKET:.0e} x {_dtype_name(prec)}"
        optimizer = P * 12 / world
        notes["optimizer states"] = f"fp32 master + AdamW m, v of {_short(P)} trainable, 1/{world} per rank"
        if spec.offload:
            host["offloaded optimizer states"] = optimizer * local
            host_notes["offloaded optimizer states"] = notes["optimizer states"] + f", x {local} rank(s)"
            optimizer, notes["optimizer states"] = 0.0, "in host RAM (offload)"
        grads_persistent = True
    else:
        buckets = (cfg.strategy == "ddp" or cfg.strategy == "auto") and world > 1
        grads = P * 4 * (2 if buckets else 1)
        notes["gradients"] = "fp32" + (" + DDP's bucket copies" if buckets else "")
        optimizer, notes["optimizer states"] = P * 8, f"AdamW m, v (fp32) of {_short(P)} trainable"
        grads_persistent = cfg.accumulate_grad_batches > 1
    if not grads_persistent:
        notes["gradients"] += " (formed during backward)"
    rows["gradients"] = grads
    rows["optimizer states"] = optimizer
    rows = {k: rows[k] for k in ("weights", "ZeRO-3 gathered blocks", "gradients", "optimizer states",
                                 "framework buffers") if k in rows}
    static = [k for k in rows if k != "gradients" or grads_persistent]

    # activations, logits, state, backward
    B, T = cfg.micro_bsz, cfg.ctx_len
    chunked = bool(cfg.chunk_ctx) and cfg.chunk_ctx < T
    t = cfg.chunk_ctx if chunked else T
    d = _dynamic(mcfg, cfg, adapter, m, backend, B, t, bool(cfg.grad_cp), carried_state=chunked)
    rows["activations"] = d.kept
    notes["activations"] = (f"saved for backward: {mcfg.n_layer} blocks x {B}x{t} tokens"
                            + (" (grad_cp: each block's input)" if cfg.grad_cp else f", wkv {backend}")
                            + (f"; one of {-(-T // cfg.chunk_ctx)} chunks" if chunked else ""))
    head_tokens = min(cfg.head_chunk, t) if cfg.head_chunk else t
    rows["logits"] = d.logits + d.head
    notes["logits"] = (f"{B}x{head_tokens} x vocab {mcfg.vocab_size}: fp32 log-softmax"
                       + (f" + {_dtype_name(m.lin)} logits (L2Wrap)" if cfg.l2wrap else "")
                       + "; the final norm's input")
    rows["logits gradient"] = d.logits_grad + counts.trainable_head * 4
    notes["logits gradient"] = ("fp32 gradients of the log-softmax and the logits, during the loss backward"
                                + (" (+ the head's weight gradient)" if counts.trainable_head else ""))
    state = mcfg.n_layer * B * mcfg.n_head * mcfg.head_size ** 2 * 4
    if chunked:
        # Per layer: two (B, C) token-shift states (copies of the last token) and the (B, H, N, N) fp32 WKV state.
        per_boundary = mcfg.n_layer * B * (2 * mcfg.n_embd * m.stream + mcfg.n_head * mcfg.head_size ** 2 * 4)
        rows["WKV state"] = -(-T // cfg.chunk_ctx) * per_boundary
        notes["WKV state"] = ("states at every chunk boundary: (B, H, N, N) fp32 WKV states and the token-shift "
                              "states")
    else:
        rows["WKV state"] = state
        notes["WKV state"] = "(B, H, N, N) fp32 per block, alive in the forward only"
    if cfg.grad_cp:
        rows["block recompute"] = d.recompute
        notes["block recompute"] = f"one block's saved tensors, recomputed in backward (wkv {backend})"
    rows["block backward"] = d.workspace
    notes["block backward"] = f"gradients formed inside one block's backward (~{WORKSPACE:.0%} of its saved tensors)"
    dense = 0.0
    rebuilt = adapter.method in ("bone_unconstrained", "bone_hadamard") or (
        adapter.method == "bone" and adapter.grouping == "col")
    if quant or rebuilt:
        dense = counts.largest_projection * (m.lin + (0 if quant else 4))
        rows["dense weight copy"] = dense
        notes["dense weight copy"] = ("the largest projection dequantised for its matmul" if quant else
                                      "Bone's W' of the largest projection, rebuilt (fp32 math) in backward")
    loss_phase = ["activations", "logits", "logits gradient"] + (["WKV state"] if chunked else [])
    block_phase = ["activations", "block backward", "gradients"] + (["block recompute"] if cfg.grad_cp else []) \
        + (["dense weight copy"] if dense else []) + (["WKV state"] if chunked else [])
    at_peak = grads
    if not grads_persistent and P > counts.trainable_outside_blocks:
        # Gradients form block by block while the saved tensors are freed: the last block's backward meets every
        # saved tensor but only the gradients outside the blocks and of that block; the first block's meets
        # every gradient but one block's saved tensors (straight lines in between: the larger end is the peak).
        per_block = (P - counts.trainable_outside_blocks) / mcfg.n_layer * 4 * grads / (P * 4)
        early = grads - per_block * (mcfg.n_layer - 1)
        start = rows["activations"] + early
        end = (d.block if not cfg.grad_cp else rows["activations"]) + grads
        at_peak = grads if end >= start else early
    loss_total = sum(rows[k] for k in loss_phase)
    block_total = sum(rows[k] for k in block_phase) - grads + at_peak
    phase, terms = (("the loss backward", loss_phase) if loss_total >= block_total else
                    ("a block's backward", block_phase))
    if terms is block_phase and at_peak < grads:
        rows["gradients"] = at_peak
        notes["gradients"] += ": those outside the blocks and of the last block, at the peak"
        rows = _insert_after(rows, "gradients", "gradients formed later", grads - at_peak)
        notes["gradients formed later"] = "the other blocks' gradients, formed after the peak"
    peak_terms = list(dict.fromkeys(static + terms))

    # host RAM
    ckpt = checkpoint_bytes if checkpoint_bytes is not None else (counts.frozen_projection + counts.frozen_other) * 2
    model_host = weights_in_load_dtype(counts, cfg, quant)
    host = {"loading": local * (PROCESS_RAM + ckpt + model_host), **host}
    host_notes["loading"] = (f"{local} process(es) x ({gib(PROCESS_RAM)} runtime + the checkpoint read "
                             f"({gib(ckpt)}) + the model built from it ({gib(model_host)}))")
    if not on_gpu:
        extra.append("training on the CPU: the device rows are host RAM too")
    setting = (f"RWKV6 {mcfg.n_layer}x{mcfg.n_embd} vocab {mcfg.vocab_size}, {_adapter_name(adapter)}"
               f"{', ' + quant + ' base' if quant else ''}, {cfg.strategy} {cfg.precision}, {world} rank(s), "
               f"ctx {T} x micro_bsz {B}, grad_cp {int(bool(cfg.grad_cp))}"
               + (f", chunk_ctx {cfg.chunk_ctx}" if cfg.chunk_ctx else "")
               + (f", head_chunk {cfg.head_chunk}" if cfg.head_chunk else "") + f", wkv {backend}")
    return MemoryEstimate(setting=setting, rows={k: int(v) for k, v in rows.items()}, row_notes=notes,
                          peak_terms=peak_terms, phase=phase, host_rows={k: int(v) for k, v in host.items()},
                          host_notes=host_notes, params=counts, on_gpu=on_gpu, notes=extra)


def _insert_after(rows: dict[str, float], after: str, name: str, value: float) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in rows.items():
        out[k] = v
        if k == after:
            out[name] = value
    return out


def weights_in_load_dtype(counts: ParamCounts, cfg: TrainConfig, quant: str | None) -> float:
    """Bytes of the model as train.py builds it on the CPU before the strategy moves it."""
    base = 4 if cfg.adapter.method == "none" else PRECISION_BYTES[cfg.precision]
    proj = quant_bytes(quant, counts.frozen_projection, counts.projection_rows) if quant \
        else counts.frozen_projection * base
    return proj + counts.frozen_other * base + counts.trainable * 4


def _ranks_per_node(cfg: TrainConfig, world: int) -> int:
    return max(1, min(cfg.devices, world))


def _short(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def _dtype_name(nbytes: int) -> str:
    return {1: "int8", 2: "bf16/fp16", 4: "fp32"}.get(nbytes, f"{nbytes} B")


def _adapter_name(a: AdapterConfig) -> str:
    if a.method.startswith("bone"):
        return f"{a.method} b={a.b} {a.grouping}"
    if a.method in ("lora", "pissa"):
        return f"{a.method} r={a.lora_r}"
    return {"none": "full training", "state": "state tuning"}.get(a.method, a.method)
