"""Preflight: the machine checked against the configuration before anything is loaded, every problem reported at
once with its fix. train.py runs it before the model or the data is read (errors end the run with exit code 2
and no traceback; warnings are printed and the run goes on); `--dry_run` prints every finding.

The facts about the machine (GPUs, their bf16 support and memory, the CUDA toolchain, free disk, RAM) come in one
`MachineFacts`, gathered by `gather_facts`, the only function here that reads the environment (from the mapping
it is given); the checks are pure functions of (TrainConfig, model sizes, MachineFacts), so tests pass fakes for
the GPU-side facts. Every message comes from `MESSAGES`, which `python -m scripts.common_errors` renders as the
README's "common errors and their fixes".
"""
from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from src.config import TrainConfig
from src.errors import ConfigError, RWKVBoneError
from src.rwkv6 import RWKV6Config
from src.training.cuda_env import find_cuda_home
from src.training.memory import (
    PRECISION_BYTES,
    PROCESS_RAM,
    GiB,
    MemoryEstimate,
    count_parameters,
    estimate_memory,
    gib,
    resolved_backend,
)

BF16_MIN_CAPABILITY = (8, 0)  # Ampere: A100, RTX 30xx and newer; V100 (7.0) and T4 (7.5) have no bf16


@dataclass(frozen=True)
class Message:
    """One kind of problem: `text` and `fix` are format strings over the finding's details; `example` holds
    details for the README rendering."""

    title: str
    text: str
    fix: str
    example: Mapping[str, str] = field(default_factory=dict)
    severity: str = "error"  # "warning": printed, the run goes on


MESSAGES: dict[str, Message] = {
    "no_cuda": Message(
        "A GPU strategy or accelerator, but no CUDA device",
        "{what} needs a CUDA GPU, but torch sees none: {why}.",
        "run on a machine with an NVIDIA GPU and a CUDA build of torch, or train on the CPU with "
        "`--strategy auto --accelerator cpu`.",
        {"what": "--strategy deepspeed_stage_2", "why": "this torch (2.13.0+cpu) is a CPU build"}),
    "too_many_devices": Message(
        "More --devices than visible GPUs",
        "--devices {devices} asks for {devices} GPUs, but {visible} {are} visible{hidden}.",
        "use `--devices {visible}`, or make the GPUs visible (check CUDA_VISIBLE_DEVICES and nvidia-smi).",
        {"devices": "4", "visible": "2", "are": "are", "hidden": " (CUDA_VISIBLE_DEVICES=0,1)"}),
    "no_bf16": Message(
        "--precision bf16 on a GPU without bf16",
        "--precision bf16 needs bf16 support (compute capability 8.0 or newer), but {gpu} is sm_{cap}.",
        "use `--precision fp16` (loss scaling is automatic) or `--precision fp32`.",
        {"gpu": "GPU 0 (Tesla V100-SXM2-32GB)", "cap": "70"}),
    "wkv_cuda": Message(
        "--wkv_backend cuda without a usable CUDA toolchain",
        "WKV backend 'cuda' is not available: {why}.",
        "{fix}; or use `--wkv_backend auto` (falls back to fla, then torch) or `--wkv_backend torch`.",
        {"why": "nvcc (the CUDA compiler) is not found: CUDA_HOME is unset and no nvcc is on PATH",
         "fix": "install the CUDA toolkit and `export CUDA_HOME=/usr/local/cuda-12.4`"}),
    "wkv_fallback": Message(
        "--wkv_backend auto falls back from the CUDA kernel",
        "--wkv_backend auto: the CUDA WKV kernel cannot be used here ({why}); training uses the {fallback} "
        "backend instead{slower}.",
        "{fix} to get the kernel back, or pass `--wkv_backend {fallback}` to silence this.",
        {"why": "ninja is not installed (torch's JIT extension build needs it)", "fallback": "torch",
         "slower": " (slower, and it keeps more memory for backward)", "fix": "`pip install ninja`"}, "warning"),
    "wkv_fla": Message(
        "--wkv_backend fla without a usable fla",
        "WKV backend 'fla' is not available: {why}.",
        "`pip install flash-linear-attention` on a machine with a CUDA GPU and triton, or use `--wkv_backend auto`.",
        {"why": "neither `fla` nor `rwkvfla` is installed"}),
    "wkv_cpu": Message(
        "A GPU-only WKV backend on the CPU",
        "WKV backend '{backend}' is not available: it runs on CUDA GPUs only, and this run trains on the CPU.",
        "use `--wkv_backend torch` (or auto) on the CPU.",
        {"backend": "cuda"}),
    "disk": Message(
        "Not enough disk space in --proj_dir",
        "--proj_dir {path} has {free} free, but the run keeps up to {need}: {what}.",
        "free space there, use another --proj_dir, or keep fewer states (`--keep_last 1`).",
        {"path": "runs/bone", "free": "3.1 GiB", "need": "5.4 GiB",
         "what": "3 training states of 1.3 GiB (--keep_last 2, one more while a new one is written) and 2 adapter "
                 "files of 126 MiB"}),
    "ram": Message(
        "Not enough host RAM",
        "this run needs about {need} of host RAM ({what}), but the machine has {have}.",
        "{fix}",
        {"need": "62 GiB", "what": "loading: 2 process(es) x (2 GiB runtime + the checkpoint read (14 GiB) + the "
                                   "model built from it (14 GiB))", "have": "32 GiB total",
         "fix": "use fewer --devices per machine, or a machine with more RAM."}),
    "gpu_memory": Message(
        "The estimated peak does not fit the GPU",
        "the estimated peak memory per GPU is {need} (with the CUDA context and allocator slack), but {gpu} "
        "has {have}.",
        "{fix}",
        {"need": "26.1 GiB", "gpu": "GPU 0 (NVIDIA GeForce RTX 4090)", "have": "23.6 GiB",
         "fix": "try `--grad_cp 1`, a smaller --micro_bsz (with more --accumulate_grad_batches), `--head_chunk "
                "1024`, a DeepSpeed offload strategy (`python train.py ... --dry_run` prints the estimate)."},
        "warning"),
    "checkpoint": Message(
        "The base model cannot be read",
        "{why}",
        "give an official x060 checkpoint with --load_model.",
        {"why": "/models/RWKV-x060-World-1B6.pth: no such file."}),
}


@dataclass(frozen=True)
class GPU:
    name: str
    capability: tuple[int, int]
    total_memory: int

    @property
    def bf16(self) -> bool:
        return self.capability >= BF16_MIN_CAPABILITY


@dataclass(frozen=True)
class MachineFacts:
    """What the checks need to know about the machine. `gather_facts` reads them; tests pass their own."""

    gpus: tuple[GPU, ...] = ()
    torch_version: str = ""
    torch_cuda: str | None = None  # torch.version.cuda: None for a CPU build of torch
    cuda_visible_devices: str | None = None  # as set in the environment (None: unset)
    cuda_home: str | None = None  # the toolkit root the JIT build uses (CUDA_HOME / CUDA_PATH / torch's guess)
    cuda_home_found: str | None = None  # a toolkit found on disk (for the fix when cuda_home is unset)
    nvcc: str | None = None  # the nvcc the build would run
    ninja: str | None = None
    arch_list: str | None = None  # TORCH_CUDA_ARCH_LIST
    fla_error: str | None = "not checked"  # None when fla's chunk_rwkv6 is usable, else why not
    disk_path: str = "."
    disk_free: int | None = None  # bytes free where --proj_dir is (or would be created)
    ram_total: int | None = None
    ram_available: int | None = None

    @property
    def cuda(self) -> bool:
        return bool(self.gpus)


def gather_facts(environ: Mapping[str, str], proj_dir: str | Path = ".") -> MachineFacts:
    """The machine's facts. The only place in the library that looks at environment variables: from `environ`
    (train.py passes os.environ)."""
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(GPU(p.name, (p.major, p.minor), p.total_memory))
    path = environ.get("PATH")
    nvcc_on_path = shutil.which("nvcc", path=path)
    home = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    if not home and torch.version.cuda is not None:
        from torch.utils.cpp_extension import CUDA_HOME as torch_home  # torch's own guess (nvcc, /usr/local/cuda)

        home = torch_home
    nvcc = str(Path(home) / "bin" / "nvcc") if home and (Path(home) / "bin" / "nvcc").is_file() else nvcc_on_path
    fla_error: str | None = "no CUDA device"
    if gpus:
        from src import wkv

        found = wkv._fla_resolution()
        fla_error = str(found) if isinstance(found, Exception) else None
    disk = Path(proj_dir).resolve()
    while not disk.exists() and disk != disk.parent:
        disk = disk.parent
    try:
        free: int | None = shutil.disk_usage(disk).free
    except OSError:
        free = None
    total, available = _ram()
    return MachineFacts(
        gpus=tuple(gpus), torch_version=torch.__version__, torch_cuda=torch.version.cuda,
        cuda_visible_devices=environ.get("CUDA_VISIBLE_DEVICES"), cuda_home=home or None,
        cuda_home_found=None if home else find_cuda_home(nvcc_on_path), nvcc=nvcc,
        ninja=shutil.which("ninja", path=path), arch_list=environ.get("TORCH_CUDA_ARCH_LIST") or None,
        fla_error=fla_error, disk_path=str(disk), disk_free=free, ram_total=total, ram_available=available)


def _ram() -> tuple[int | None, int | None]:
    """(total, available) host RAM in bytes, from /proc/meminfo (None where unknown)."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(info["MemTotal"].split()[0]) * 1024, int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None, None


@dataclass(frozen=True)
class Finding:
    """One problem: `code` names its MESSAGES entry; errors stop a run, warnings do not."""

    code: str
    severity: str  # "error" | "warning"
    text: str
    fix: str

    def line(self) -> str:
        return f"{self.severity}: {self.text} Fix: {self.fix}"


def finding(code: str, severity: str | None = None, **details: object) -> Finding:
    """The MESSAGES[code] finding filled with `details` (severity: the message's unless given)."""
    message = MESSAGES[code]
    values = {k: str(v) for k, v in details.items()}
    return Finding(code, severity or message.severity, message.text.format_map(values),
                   message.fix.format_map(values))


def common_errors_markdown() -> str:
    """The README's "common errors and their fixes": every MESSAGES entry, with the finding the checks give for
    an example machine and configuration (`example_findings`)."""
    examples = example_findings()
    lines = ["## Common errors and their fixes", "",
             "`python train.py` checks the machine against the configuration before it reads the model or the data "
             "and reports every problem at once, each with its fix (exit code 2, no traceback); warnings are printed "
             "and the run goes on. `--dry_run` prints the same findings beside the memory estimate. Generated by "
             "`python -m scripts.common_errors` from the messages in `src/training/preflight.py`."]
    for code, message in MESSAGES.items():
        example = examples.get(code) or finding(code, **message.example)
        lines += ["", f"**{message.title}**" + (" (a warning)" if example.severity == "warning" else ""), "",
                  "```", f"{example.severity}: {example.text}", "```", "", f"Fix: {example.fix}"]
    return "\n".join(lines) + "\n"


def example_findings() -> dict[str, Finding]:
    """What the checks say for example machines (fake facts) and the RWKV6 1.6B / 7B presets' sizes."""
    m16 = RWKV6Config(n_layer=24, n_embd=2048, vocab_size=65536)
    m7 = RWKV6Config(n_layer=32, n_embd=4096, vocab_size=65536, d_mix=64, d_decay=128)
    rtx4090 = GPU("NVIDIA GeForce RTX 4090", (8, 9), 25_386_352_640)
    v100 = GPU("Tesla V100-SXM2-32GB", (7, 0), 34_089_730_048)
    good = MachineFacts(gpus=(rtx4090,), torch_version="2.4.1+cu124", torch_cuda="12.4",
                        cuda_home="/usr/local/cuda-12.4", nvcc="/usr/local/cuda-12.4/bin/nvcc", ninja="/usr/bin/ninja",
                        fla_error=None, disk_free=10**12, ram_total=128 * GiB, ram_available=120 * GiB)
    sizes = dict(n_layer=24, n_embd=2048, vocab_size=65536, dry_run=True)
    cfg = TrainConfig(**sizes, strategy="deepspeed_stage_2", grad_cp=1, micro_bsz=1)  # type: ignore[arg-type]
    cpu_torch = replace(good, gpus=(), torch_version="2.4.1+cpu", torch_cuda=None)
    no_fla = "neither `fla` nor `rwkvfla` is installed (pip install flash-linear-attention (or rwkv-fla) on a " \
             "machine with triton and a CUDA GPU)"
    out = {
        "no_cuda": check_hardware(cfg, cpu_torch),
        "too_many_devices": check_hardware(replace(cfg, devices=4), replace(good, gpus=(rtx4090,) * 2,
                                                                          cuda_visible_devices="0,1")),
        "no_bf16": check_hardware(cfg, replace(good, gpus=(v100,))),
        "wkv_cuda": check_wkv(replace(cfg, wkv_backend="cuda"),
                              replace(good, cuda_home=None, nvcc=None, cuda_home_found="/usr/local/cuda-12.4"), 64,
                              build=False)[0],
        "wkv_fallback": check_wkv(cfg, replace(good, ninja=None, fla_error=no_fla), 64, build=False)[0],
        "wkv_fla": check_wkv(replace(cfg, wkv_backend="fla"), replace(good, fla_error=no_fla), 64, build=False)[0],
        "wkv_cpu": check_wkv(replace(cfg, strategy="auto", accelerator="cpu", wkv_backend="cuda"), cpu_torch, 64,
                             build=False)[0],
        "disk": check_disk(replace(cfg, proj_dir="runs/bone"), m16, replace(good, disk_free=500 * 2**20)),
        "ram": check_memory(replace(cfg, devices=4, strategy="deepspeed_stage_2_offload"),
                            estimate_memory(m7, replace(cfg, devices=4, strategy="deepspeed_stage_2_offload"),
                                            checkpoint_bytes=15_277_000_000),
                            replace(good, gpus=(rtx4090,) * 4, ram_total=64 * GiB), True),
        "gpu_memory": check_memory(replace(cfg, strategy="auto", grad_cp=0, micro_bsz=4, ctx_len=4096),
                                   estimate_memory(m16, replace(cfg, strategy="auto", grad_cp=0, micro_bsz=4,
                                                                ctx_len=4096)), good, True),
    }
    return {code: next(f for f in found if f.code == code) for code, found in out.items()
            if any(f.code == code for f in found)}


@dataclass
class Report:
    """What the preflight found, the WKV backend the run will use, and the memory estimate (when the model's
    sizes could be read)."""

    findings: list[Finding]
    backend: str | None = None
    estimate: MemoryEstimate | None = None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def raise_errors(self) -> None:
        """ConfigError listing every error (with its fix) when there is any."""
        errors = self.errors
        if len(errors) == 1:
            raise ConfigError(f"{errors[0].text} Fix: {errors[0].fix}")
        if errors:
            raise ConfigError(f"the preflight found {len(errors)} problems:\n"
                              + "\n".join(f"  - {e.text} Fix: {e.fix}" for e in errors))

    def text(self) -> str:
        """Every finding, one per line (for --dry_run)."""
        if not self.findings:
            return f"preflight: no problems found (WKV backend {self.backend})"
        return "preflight findings:\n" + "\n".join(f"  {f.line()}" for f in self.findings)


def codes_of(findings: list[Finding]) -> list[str]:
    return [f.code for f in findings]


def training_on_gpu(cfg: TrainConfig, facts: MachineFacts) -> bool:
    """Whether the run trains on CUDA GPUs (as Lightning will pick the accelerator)."""
    if cfg.accelerator == "cpu":
        return False
    if cfg.accelerator in ("gpu", "cuda") or cfg.strategy_spec.deepspeed:
        return True
    return facts.cuda


def check_hardware(cfg: TrainConfig, facts: MachineFacts) -> list[Finding]:
    """CUDA presence, --devices, bf16 support."""
    found = []
    wants_gpu = cfg.accelerator in ("gpu", "cuda") or cfg.strategy_spec.deepspeed
    if wants_gpu and not facts.cuda:
        what = f"--strategy {cfg.strategy}" if cfg.strategy_spec.deepspeed else f"--accelerator {cfg.accelerator}"
        found.append(finding("no_cuda", what=what, why=_why_no_cuda(facts)))
        return found
    if not training_on_gpu(cfg, facts):
        return found
    if cfg.devices > len(facts.gpus):
        hidden = f" (CUDA_VISIBLE_DEVICES={facts.cuda_visible_devices})" if facts.cuda_visible_devices else ""
        found.append(finding("too_many_devices", devices=cfg.devices, visible=len(facts.gpus),
                             are="is" if len(facts.gpus) == 1 else "are", hidden=hidden))
    if cfg.precision == "bf16":
        for i, gpu in enumerate(facts.gpus[: cfg.devices]):
            if not gpu.bf16:
                major, minor = gpu.capability
                found.append(finding("no_bf16", gpu=f"GPU {i} ({gpu.name})", cap=f"{major}{minor}"))
                break
    return found


def _why_no_cuda(facts: MachineFacts) -> str:
    if facts.torch_cuda is None:
        return f"this torch ({facts.torch_version}) is a CPU build; install a CUDA build of torch"
    if facts.cuda_visible_devices is not None and facts.cuda_visible_devices.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={facts.cuda_visible_devices!r} hides every GPU"
    return (f"torch {facts.torch_version} (CUDA {facts.torch_cuda}) finds no GPU: no NVIDIA GPU, or its driver is "
            f"missing or too old (see nvidia-smi)")


def toolchain_problems(facts: MachineFacts) -> list[tuple[str, str]]:
    """(what is missing, its fix) for building the CUDA WKV kernel, in the order to fix them."""
    out = []
    if facts.torch_cuda is None:
        out.append((f"this torch ({facts.torch_version}) is a CPU build", "install a CUDA build of torch"))
    if not facts.nvcc:
        out.append(("nvcc (the CUDA compiler) is not found: CUDA_HOME is unset and no nvcc is on PATH"
                    if not facts.cuda_home else f"CUDA_HOME={facts.cuda_home} has no bin/nvcc",
                    "install the CUDA toolkit" + (f" and `export CUDA_HOME={facts.cuda_home_found}`"
                                                  if facts.cuda_home_found else ", then set CUDA_HOME to its root")))
    elif not facts.cuda_home:
        found = facts.cuda_home_found
        out.append(("CUDA_HOME is unset and torch cannot locate the toolkit",
                    f"`export CUDA_HOME={found}`" if found else "set CUDA_HOME to the toolkit root (the folder with "
                                                                 "bin/nvcc and lib64/libcudart.so)"))
    if not facts.ninja:
        out.append(("ninja is not installed (torch's JIT extension build needs it)", "`pip install ninja`"))
    if facts.arch_list and facts.gpus:
        listed = {a.strip().split("+")[0] for a in facts.arch_list.replace(",", ";").split(";") if a.strip()}
        for gpu in facts.gpus:
            arch = f"{gpu.capability[0]}.{gpu.capability[1]}"
            if arch not in listed:
                out.append((f"TORCH_CUDA_ARCH_LIST={facts.arch_list!r} does not include {arch}, the compute "
                            f"capability of {gpu.name}", f'`export TORCH_CUDA_ARCH_LIST="{arch}"`'))
                break
    return out


def check_wkv(cfg: TrainConfig, facts: MachineFacts, head_size: int, build: bool) -> tuple[list[Finding], str]:
    """Whether the configured WKV backend can run; (findings, the backend the run will use). With `build`, a
    CUDA kernel that the toolchain should be able to build is built now, so a failure is known (and, under
    auto, a fallback chosen) before anything is loaded."""
    from src import wkv

    backend = cfg.wkv_backend
    on_gpu = training_on_gpu(cfg, facts)
    if not on_gpu:
        if backend in ("cuda", "fla"):
            return [finding("wkv_cpu", backend=backend)], "torch"
        return [], "torch"
    if backend == "torch":
        return [], "torch"
    if backend == "fla":
        if facts.fla_error is not None:
            return [finding("wkv_fla", why=facts.fla_error)], "torch"
        return [], "fla"
    problems = toolchain_problems(facts)
    if not problems and build and facts.cuda:
        error = wkv.cuda_kernel_error(head_size)
        if error is not None:
            problems = [(f"building cuda/wkv6.cu failed ({error})",
                         "run `bash scripts/gpu_check.sh --sections environment,build` to see the compiler's output")]
    if not problems:
        return [], "cuda"
    why = "; ".join(p for p, _ in problems)
    fix = "; ".join(f for _, f in problems)
    if backend == "cuda":
        return [finding("wkv_cuda", why=why, fix=fix)], "cuda"
    fallback = "fla" if facts.fla_error is None else "torch"
    slower = " (slower, and it keeps more memory for backward)" if fallback == "torch" else ""
    return [finding("wkv_fallback", severity="warning", why=why, fallback=fallback, slower=slower,
                    fix=fix)], fallback


def run_files_bytes(cfg: TrainConfig, mcfg: RWKV6Config) -> tuple[int, str]:
    """(bytes, description) of what the run keeps in --proj_dir at most: --keep_last training states plus one
    being written (the trainable tensors, AdamW's two moments and, under DeepSpeed, the fp32 master copy next to
    the module's copy), and the adapter (or model) files of every --epoch_save epoch and the end."""
    counts = count_parameters(mcfg, cfg.adapter)
    P = counts.trainable
    per_param = (PRECISION_BYTES[cfg.precision] + 12) if cfg.strategy_spec.deepspeed else 4 + 8
    state = P * per_param
    states = cfg.keep_last + 1
    n_files = cfg.epoch_count // cfg.epoch_save + 1
    if cfg.peft == "none":
        file = (counts.frozen_projection + counts.frozen_other + P) * PRECISION_BYTES[cfg.precision]
        kind = "model files"
    else:
        file = P * 4 * (2 if cfg.peft == "pissa" else 1)  # PiSSA also saves its frozen A0, B0 (shapes of A, B)
        kind = "adapter files"
    total = states * state + n_files * file + 16 * 2**20  # metrics, config, plot
    what = (f"{states} training states of {gib(state)} (--keep_last {cfg.keep_last}, one more while a new one is "
            f"written) and {n_files} {kind} of {gib(file)}")
    return total, what


def check_disk(cfg: TrainConfig, mcfg: RWKV6Config, facts: MachineFacts) -> list[Finding]:
    if facts.disk_free is None:
        return []
    need, what = run_files_bytes(cfg, mcfg)
    if need > facts.disk_free:
        return [finding("disk", path=cfg.proj_dir, free=gib(facts.disk_free), need=gib(need), what=what)]
    return []


def check_memory(cfg: TrainConfig, estimate: MemoryEstimate, facts: MachineFacts, on_gpu: bool) -> list[Finding]:
    """Host RAM (loading, offloaded states; on the CPU the whole run) and the GPU's memory against the estimate."""
    found = []
    need = estimate.host_total
    what = "; ".join(f"{name} {gib(v)}" for name, v in estimate.host_rows.items())
    if not on_gpu:  # the model trains in host RAM: the larger of loading and the training peak, per process
        ranks = max(1, cfg.devices)
        loading = estimate.host_rows.get("loading", 0)
        per_load = loading / ranks - PROCESS_RAM
        need += ranks * (PROCESS_RAM + max(per_load, estimate.peak)) - loading
        what = (f"{ranks} process(es) x ({gib(PROCESS_RAM)} runtime + the larger of loading, {gib(per_load)}, and "
                f"training on the CPU, {gib(estimate.peak)})")
    if not on_gpu:
        fix = ("train on a GPU, or shrink the CPU run: `--grad_cp 1`, a smaller --micro_bsz or --ctx_len, "
               "`--head_chunk 1024`, fewer --devices.")
    elif cfg.strategy_spec.offload:
        fix = "use a DeepSpeed strategy without offload, fewer --devices per machine, or a machine with more RAM."
    else:
        fix = "use fewer --devices per machine, a smaller model, or a machine with more RAM."
    if facts.ram_total is not None and need > facts.ram_total:
        found.append(finding("ram", need=gib(need), what=what, have=f"{gib(facts.ram_total)} total", fix=fix))
    elif facts.ram_available is not None and need > facts.ram_available:
        found.append(finding("ram", "warning", need=gib(need), what=what,
                             have=f"{gib(facts.ram_available)} available now", fix="close other programs, or " + fix))
    if on_gpu and facts.gpus:
        used = facts.gpus[: cfg.devices]
        smallest = min(used, key=lambda g: g.total_memory)
        if estimate.device_total > smallest.total_memory:
            fixes = []
            if not cfg.grad_cp:
                fixes.append("`--grad_cp 1`")
            if cfg.micro_bsz > 1:
                fixes.append("a smaller --micro_bsz (with more --accumulate_grad_batches)")
            if not cfg.head_chunk:
                fixes.append("`--head_chunk 1024`")
            if not cfg.chunk_ctx and cfg.ctx_len > 2048:
                fixes.append("`--chunk_ctx 2048`")
            if not cfg.strategy_spec.offload:
                fixes.append("a DeepSpeed offload strategy")
            fix_text = ("try " + ", ".join(fixes) if fixes else "use a GPU with more memory or a smaller --ctx_len") \
                + " (`python train.py ... --dry_run` prints the estimate)."
            found.append(finding("gpu_memory", "warning", need=gib(estimate.device_total),
                                 gpu=f"GPU {facts.gpus.index(smallest)} ({smallest.name})",
                                 have=gib(smallest.total_memory), fix=fix_text))
    return found


def read_model_config(cfg: TrainConfig) -> tuple[RWKV6Config, int | None]:
    """The model's sizes without loading its weights (a checkpoint's tensor shapes, or the size flags) and the
    checkpoint's file size. Errors are the loader's (CheckpointError)."""
    if not cfg.load_model:
        return RWKV6Config(n_layer=cfg.n_layer, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size), None  # type: ignore[arg-type]
    from src.checkpoint import load_tensors
    from src.model import checkpoint_shapes

    path = Path(cfg.load_model)
    try:
        shapes = checkpoint_shapes(path)
    except RWKVBoneError:
        if path.suffix == ".safetensors":
            raise
        # e.g. a legacy (non-zip) .pth cannot be memory-mapped: read it, or say why not
        shapes = {k: tuple(v.shape) for k, v in load_tensors(path).items()}
    mcfg = RWKV6Config.from_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    return mcfg, path.stat().st_size


def preflight(cfg: TrainConfig, facts: MachineFacts, *, build: bool = True, quant: str | None = None) -> Report:
    """Every check of the machine against `cfg`. The machine checks need no model; the disk and memory checks
    need the model's sizes: a checkpoint that cannot be read is a finding beside the others, and raised as the
    loader's own error when it is the only problem. `build`: build the CUDA WKV kernel now if it will be used."""
    findings = check_hardware(cfg, facts)
    model: RWKV6Config | None = None
    ckpt_bytes = None
    unreadable: RWKVBoneError | None = None
    try:
        model, ckpt_bytes = read_model_config(cfg)
    except RWKVBoneError as e:
        unreadable = e
    hardware_ok = not any(f.severity == "error" for f in findings)
    backend = resolved_backend(cfg, training_on_gpu(cfg, facts))
    if "no_cuda" not in codes_of(findings):  # without a GPU, what the GPU backends lack is beside the point
        wkv_findings, backend = check_wkv(cfg, facts, model.head_size if model else 64,
                                          build=build and hardware_ok and unreadable is None)
        findings += wkv_findings
    if unreadable is not None:
        if not any(f.severity == "error" for f in findings):
            raise unreadable
        findings.append(finding("checkpoint", why=str(unreadable)))
    report = Report(findings, backend)
    if model is None:
        return report
    on_gpu = training_on_gpu(cfg, facts)
    estimate = estimate_memory(model, cfg, on_gpu=on_gpu, wkv_backend=backend, quant=quant,
                               checkpoint_bytes=ckpt_bytes)
    # --dry_run on a machine without a GPU plans a GPU run unless --accelerator cpu says otherwise
    plan_gpu = not on_gpu and cfg.dry_run and cfg.accelerator != "cpu"
    report.estimate = estimate_memory(model, cfg, on_gpu=True, quant=quant, checkpoint_bytes=ckpt_bytes) \
        if plan_gpu else estimate
    findings += check_disk(cfg, model, facts)
    findings += check_memory(cfg, estimate, facts, on_gpu)
    return report
