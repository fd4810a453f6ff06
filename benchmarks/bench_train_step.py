"""Training-step time and memory of singular-value fine-tuning, side by side with the alternatives.

One run compares, on the same randomly initialised CLIP (ViT-B/16 widths), the same inputs and
the same optimizer (AdamW):

- `full`: full fine-tuning of every parameter;
- `lora`: PEFT LoRA as CLIP-LoRA configures it (r=2, alpha=1, dropout 0.25, q/k/v of both encoders);
- `reference_77`: the rule of the public CLIP-SVD code (`benchmarks/_reference.py`: every targeted
  Linear computes `U (s * (Vh x)) + b`), with text prompts padded to 77 tokens as that code does;
- `reference`: the same rule with the prompts padded like everyone else's (to the longest
  prompt), which separates the cost of the rule from the cost of the padding;
- `svd`: peft-svd with its defaults;
- `eval_base`, `eval_svd`, `eval_svd_merged`, `eval_reference`: evaluation (no gradients) of the
  frozen base model, the adapted model unmerged and merged (`merge_adapter`), and the reference.

A training step is the full few-shot recipe: a batch of images through the image encoder, ALL
class prompts through the text encoder with gradients, `logit_scale * cos(image, text)`,
cross-entropy, backward, AdamW step. An evaluation step encodes a batch of images and scores it
against text features computed once beforehand.

Prompts are synthetic token ids with the shape of "a photo of a {class name}.": start token, four
template tokens, a class name of 1-3 words of 1-3 BPE tokens each, ".", end token (8-16 tokens).
All methods but `reference_77` pad them to the longest prompt.

Every round runs one step of every method in turn (rotating the order). Step times are medians
over rounds; a ratio between two methods is the median of their per-round ratios, so that the
load of a shared machine mostly cancels. Process CPU time is recorded next to wall time. On a
CPU shared with other jobs, `--threads 1` gives far steadier ratios: with two threads, every
operator waits at a barrier whenever one of them is descheduled.

Peak memory is measured for each method in its own subprocess: on a GPU
`torch.cuda.max_memory_allocated` minus the memory allocated after the model is built; on the
CPU the peak resident set size (`VmHWM`, reset through /proc/self/clear_refs after the build)
minus the resident set size after the build, with glibc made to return freed blocks at once
(`MALLOC_MMAP_THRESHOLD_`). Both count what training adds (activations, gradients, optimizer
state); the memory of the model itself (parameters, buffers and peft-svd's factors) is reported
apart, and "incl. model" ratios add it.

    python benchmarks/bench_train_step.py                  # CPU default: a few minutes on 2 cores
    python benchmarks/bench_train_step.py --prompts 1000
    python benchmarks/bench_train_step.py --device cuda --blocks 12 --batch 32 --precision bf16

Prints a markdown table and writes JSON (`--json`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

TRAIN_METHODS = ("full", "lora", "reference_77", "reference", "svd")
EVAL_METHODS = ("eval_base", "eval_svd", "eval_svd_merged", "eval_reference")
METHOD_LABELS = {
    "full": "full fine-tuning",
    "lora": "LoRA r=2 q/k/v (CLIP-LoRA)",
    "reference_77": "reference rule, prompts padded to 77",
    "reference": "reference rule, same padding",
    "svd": "peft-svd (defaults)",
    "eval_base": "eval: base model",
    "eval_svd": "eval: peft-svd unmerged",
    "eval_svd_merged": "eval: peft-svd merged",
    "eval_reference": "eval: reference rule",
}
_SOT, _EOT, _CONTEXT = 49406, 49407, 77
_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- model and inputs


def clip_config(args):
    """A CLIPConfig with ViT-B/16 widths (or the widths given) and `args.blocks` blocks per encoder."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            hidden_size=args.text_width,
            intermediate_size=4 * args.text_width,
            num_hidden_layers=args.blocks,
            num_attention_heads=max(1, args.text_width // 64),
            vocab_size=args.vocab_size,
            max_position_embeddings=_CONTEXT,
            bos_token_id=_SOT % args.vocab_size,
            eos_token_id=_EOT % args.vocab_size,
            pad_token_id=_EOT % args.vocab_size,
        ),
        vision_config=dict(
            hidden_size=args.vision_width,
            intermediate_size=4 * args.vision_width,
            num_hidden_layers=args.blocks,
            num_attention_heads=max(1, args.vision_width // 64),
            image_size=args.image_size,
            patch_size=16,
        ),
        projection_dim=512 if args.text_width >= 512 else args.text_width,
    )


def synthetic_prompts(num_classes: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Token ids shaped like CLIP's tokenization of "a photo of a {class name}." (8-16 tokens)."""
    g = torch.Generator().manual_seed(seed)
    sot, eot = _SOT % vocab_size, _EOT % vocab_size
    template = [sot] + torch.randint(300, vocab_size - 2, (4,), generator=g).tolist()
    period = int(torch.randint(300, vocab_size - 2, (1,), generator=g))
    words_p = torch.tensor([0.5, 0.35, 0.15])
    pieces_p = torch.tensor([0.6, 0.3, 0.1])
    prompts = []
    for _ in range(num_classes):
        words = int(torch.multinomial(words_p, 1, generator=g)) + 1
        pieces = sum(int(torch.multinomial(pieces_p, 1, generator=g)) + 1 for _ in range(words))
        name = torch.randint(300, vocab_size - 2, (pieces,), generator=g).tolist()
        prompts.append(template + name + [period, eot])
    return prompts


def pad_prompts(prompts: list[list[int]], length: int | None, pad_id: int) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` `(num_prompts, length)`; `length=None`: the longest prompt."""
    longest = max(len(p) for p in prompts)
    if length is not None and length < longest:
        raise ValueError(f"Cannot pad to {length} tokens: the longest prompt has {longest}.")
    length = length or longest
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def make_inputs(args, device):
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = synthetic_prompts(args.prompts, args.vocab_size, seed=args.seed + 2)
    pad_id = _EOT % args.vocab_size
    return {
        "pixel_values": torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device),
        "labels": torch.randint(0, args.prompts, (args.batch,), generator=g).to(device),
        "text_longest": {k: v.to(device) for k, v in pad_prompts(prompts, args.pad_to, pad_id).items()},
        "text_77": {k: v.to(device) for k, v in pad_prompts(prompts, _CONTEXT, pad_id).items()},
    }


def build_base(args, device):
    from transformers import CLIPModel

    torch.manual_seed(args.seed)
    model = CLIPModel(clip_config(args)).to(device)
    return model.eval()


def build_method(method: str, base, args, factor_dir: str):
    """The model a method trains or evaluates, built from a copy of `base`.

    Returns:
        `(clip, trainable, peft_model)`: the CLIPModel to call (adapter layers inside), its
        trainable parameters, and the PeftModel around it (None for full fine-tuning and the
        reference rule).
    """
    from peft import LoraConfig, get_peft_model

    import peft_svd
    from _reference import apply_reference_svd

    model = copy.deepcopy(base)
    peft_model = None
    if method == "full":
        model.requires_grad_(True)
        clip = model
    elif method == "lora":
        cfg = LoraConfig(r=2, lora_alpha=1, lora_dropout=0.25, target_modules=["q_proj", "k_proj", "v_proj"])
        peft_model = get_peft_model(model, cfg)
        clip = peft_model.get_base_model()
    elif method in ("reference", "reference_77", "eval_reference"):
        clip = apply_reference_svd(model, cache_dir=factor_dir)
    elif method in ("svd", "eval_svd", "eval_svd_merged"):
        peft_model = get_peft_model(model, peft_svd.SVDConfig(factor_cache_dir=factor_dir))
        clip = peft_model.get_base_model()
        if method != "svd":
            # a non-zero singular-value change, as after training
            g = torch.Generator().manual_seed(args.seed + 3)
            with torch.no_grad():
                for _, layer in peft_svd.iter_svd_layers(clip):
                    d = layer.svd_delta["default"]
                    d.copy_(0.01 * torch.randn(d.shape, generator=g).to(d) * layer.svd_S.mean())
            if method == "eval_svd_merged":
                peft_model.merge_adapter()
    elif method == "eval_base":
        model.requires_grad_(False)
        clip = model
    else:
        raise ValueError(f"Unknown method {method!r}; choose from {TRAIN_METHODS + EVAL_METHODS}.")
    trainable = [p for p in clip.parameters() if p.requires_grad]
    clip.train(not method.startswith("eval"))
    return clip, trainable, peft_model


# ----------------------------------------------------------------------------- steps


def _autocast(args, device):
    dtype = _PRECISIONS[args.precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class Runner:
    """One method's model, optimizer and inputs; `step()` runs one training or evaluation step."""

    def __init__(self, method, base, inputs, args, device, factor_dir):
        self.method = method
        self.args, self.device, self.inputs = args, device, inputs
        self.clip, self.trainable, self.peft_model = build_method(method, base, args, factor_dir)
        self.is_eval = method.startswith("eval")
        self.text = inputs["text_77"] if method == "reference_77" else inputs["text_longest"]
        self.optimizer = None
        if not self.is_eval:
            self.optimizer = torch.optim.AdamW(self.trainable, lr=5e-4, weight_decay=0.01)
        else:
            with torch.no_grad(), _autocast(args, device):
                text = self.clip.get_text_features(**self.text).pooler_output
            self.text_features = F.normalize(text.float(), dim=-1)

    def step(self) -> tuple[float, float]:
        """Run one step; returns its wall time and the process's CPU time in seconds (GPU: synchronized)."""
        _sync(self.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        if self.is_eval:
            with torch.no_grad(), _autocast(self.args, self.device):
                image = self.clip.get_image_features(pixel_values=self.inputs["pixel_values"]).pooler_output
                logits = (
                    self.clip.logit_scale.exp() * F.normalize(image.float(), dim=-1) @ self.text_features.T
                )
            logits.argmax(-1)
        else:
            with _autocast(self.args, self.device):
                image = self.clip.get_image_features(pixel_values=self.inputs["pixel_values"]).pooler_output
                text = self.clip.get_text_features(**self.text).pooler_output
            image = F.normalize(image.float(), dim=-1)
            text = F.normalize(text.float(), dim=-1)
            logits = self.clip.logit_scale.exp().float() * image @ text.T
            loss = F.cross_entropy(logits, self.inputs["labels"])
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)
        return time.perf_counter() - start, time.process_time() - cpu_start


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- sizes


def model_bytes(module: torch.nn.Module) -> int:
    """Bytes held by the parameters, buffers and peft-svd factors of `module` (each storage once)."""
    tensors = list(module.parameters()) + list(module.buffers())
    for sub in module.modules():
        # peft-svd keeps its frozen factors as plain tensor attributes, not buffers
        tensors += [
            t for t in (getattr(sub, n, None) for n in ("svd_U", "svd_S", "svd_Vh")) if torch.is_tensor(t)
        ]
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def saved_bytes(peft_model, clip) -> int:
    """Size of what a method saves as its trained result, in bytes.

    peft-svd and LoRA: the `adapter_model.safetensors` that `save_pretrained` writes. Full
    fine-tuning and the reference code save the whole state dict: its tensor bytes (what
    `torch.save` writes, within a few kB).
    """
    if peft_model is not None:
        with tempfile.TemporaryDirectory() as tmp:
            peft_model.save_pretrained(tmp)
            return os.path.getsize(os.path.join(tmp, "adapter_model.safetensors"))
    return sum(t.numel() * t.element_size() for t in clip.state_dict().values())


# ----------------------------------------------------------------------------- memory


def _read_status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def _release_cpu_memory():
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure_memory(method: str, args) -> dict:
    """Peak memory of training (or evaluating) with one method; run in a process of its own."""
    device = torch.device(args.device)
    base = build_base(args, device)
    inputs = make_inputs(args, device)
    with tempfile.TemporaryDirectory() as factor_dir:
        runner = Runner(method, base, inputs, args, device, args.factor_dir or factor_dir)
        del base
        result = {"method": method, "model_bytes": model_bytes(runner.clip)}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            for _ in range(args.memory_steps):
                runner.step()
            peak = torch.cuda.max_memory_allocated(device)
            result.update(
                peak_above_model=peak - before, peak_total=peak, method_of_measure="cuda max_memory_allocated"
            )
        else:
            _release_cpu_memory()
            before = _read_status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak resident set size (VmHWM) to the current one
            for _ in range(args.memory_steps):
                runner.step()
            peak = _read_status("VmHWM")
            result.update(
                peak_above_model=peak - before,
                peak_total=peak - before + result["model_bytes"],
                method_of_measure="VmHWM - VmRSS after build (MALLOC_MMAP_THRESHOLD_=65536)",
            )
    return result


def memory_in_subprocess(method: str, argv: list[str], factor_dir: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    src = str(Path(__file__).resolve().parents[1] / "src")
    # the library this process imported comes first (a PYTHONPATH set by the caller wins over ./src)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), src) if p)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        *argv,
        "--measure-memory-of",
        method,
        "--factor-dir",
        factor_dir,
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement of {method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- overhead and profile


def wrapper_overhead_us() -> dict:
    """Time of one call of a small layer, in microseconds, for each way of computing it.

    The input is one token of width 64, so the times are the Python and dispatch overhead per
    layer call (forward; forward + backward for training). On a GPU, where the products are
    fast, this overhead decides whether the CPU keeps the GPU busy. Best of 5 interleaved runs.
    """
    from peft import get_peft_model

    import peft_svd
    from _reference import apply_reference_svd

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(64, 64))
    svd = get_peft_model(copy.deepcopy(plain), peft_svd.SVDConfig(target_modules=["0"])).get_base_model()
    ref = apply_reference_svd(copy.deepcopy(plain), targets=("0",))
    x = torch.randn(1, 64)
    xg = x.clone().requires_grad_(True)

    def evaluate(module):
        def run():
            with torch.no_grad():
                module(x)

        return run

    def train(module):
        def run():
            module(xg).sum().backward()

        return run

    plain[0].weight.requires_grad_(False)
    plain[0].bias.requires_grad_(False)
    cases = {
        "eval: nn.Linear": evaluate(plain.eval()),
        "eval: peft-svd (cached weight)": evaluate(svd.eval()),
        "eval: reference rule": evaluate(ref.eval()),
    }
    svd_t, ref_t = copy.deepcopy(svd).train(), copy.deepcopy(ref).train()
    plain_t = copy.deepcopy(plain).train()
    cases.update(
        {
            "train fwd+bwd: frozen nn.Linear": train(plain_t),
            "train fwd+bwd: peft-svd": train(svd_t),
            "train fwd+bwd: reference rule": train(ref_t),
        }
    )
    n = 500
    best = dict.fromkeys(cases, float("inf"))
    for fn in cases.values():
        for _ in range(50):
            fn()
    for _ in range(5):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / n)
    return {name: round(t * 1e6, 1) for name, t in best.items()}


def profile_method(method: str, args, device) -> str:
    """torch.profiler table of the top operators of one step of `method`."""
    from torch.profiler import ProfilerActivity, profile

    base = build_base(args, device)
    inputs = make_inputs(args, device)
    with tempfile.TemporaryDirectory() as factor_dir:
        runner = Runner(method, base, inputs, args, device, args.factor_dir or factor_dir)
        runner.step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            runner.step()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows)


# ----------------------------------------------------------------------------- report


def machine_description(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            cpu = m.group(1) if m else cpu
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def forms_chosen(args) -> dict:
    """Which form peft-svd's `auto` mode picks for each layer shape at this run's token counts."""
    from peft_svd.layer import _use_factored_for

    vision_tokens = args.batch * (1 + (args.image_size // 16) ** 2)
    longest = max(len(p) for p in synthetic_prompts(args.prompts, args.vocab_size, args.seed + 2))
    text_tokens = args.prompts * (args.pad_to or longest)
    out = {}
    for encoder, width, tokens in (
        ("vision", args.vision_width, vision_tokens),
        ("text", args.text_width, text_tokens),
    ):
        for name, (o, i) in (
            ("q/k/v/out", (width, width)),
            ("fc1", (4 * width, width)),
            ("fc2", (width, 4 * width)),
        ):
            factored = _use_factored_for(tokens, o, i, min(o, i))
            out[f"{encoder} {name} ({tokens} tokens)"] = "factored" if factored else "merged"
    return out


def _fmt_bytes(n):
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def paired_ratio(methods: dict, a: str, b: str, field: str = "times_s") -> float | None:
    """Median over rounds of `a`'s step time divided by `b`'s in the same round.

    Methods of one round run back to back, so the load of a shared machine mostly cancels in
    each round's ratio; the median then drops the rounds where it did not.
    """
    if a not in methods or b not in methods:
        return None
    return statistics.median(x / y for x, y in zip(methods[a][field], methods[b][field], strict=True))


def render_table(result: dict) -> str:
    m = result["methods"]
    ref, lora = m.get("reference", {}), m.get("lora", {})
    lines = [
        "| method | step (ms, median) | images/s | time vs reference | vs reference@77 | peak memory above model | "
        "vs reference | vs LoRA | model memory | trainable params | saved result |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    for name in TRAIN_METHODS:
        if name not in m:
            continue
        r = m[name]
        lines.append(
            f"| {METHOD_LABELS[name]} | {f(r['median_s'] * 1e3, '.0f')} | {f(r['images_per_s'], '.1f')} "
            f"| {f(paired_ratio(m, name, 'reference'))} | {f(paired_ratio(m, name, 'reference_77'))} "
            f"| {_fmt_bytes(r.get('peak_above_model'))} | {f(_ratio(r.get('peak_above_model'), ref.get('peak_above_model')))} "
            f"| {f(_ratio(r.get('peak_above_model'), lora.get('peak_above_model')))} | {_fmt_bytes(r.get('model_bytes'))} "
            f"| {r['trainable_params']:,} | {_fmt_bytes(r.get('saved_bytes'))} |"
        )
    if any(name in m for name in EVAL_METHODS):
        lines += [
            "",
            "| evaluation | step (ms, median) | images/s | throughput vs base |",
            "|---|---|---|---|",
        ]
    for name in EVAL_METHODS:
        if name not in m:
            continue
        r = m[name]
        lines.append(
            f"| {METHOD_LABELS[name]} | {f(r['median_s'] * 1e3, '.0f')} | {f(r['images_per_s'], '.1f')} "
            f"| {f(paired_ratio(m, 'eval_base', name))} |"
        )
    return "\n".join(lines)


def targets(result: dict) -> list[dict]:
    """The issue's targets that this run can check, with the measured value.

    Time ratios are medians of per-round ratios of wall time (and, as a check on a shared
    machine, of process CPU time); memory ratios compare the peaks above the model.
    """
    m = result["methods"]
    rows = []

    def add(name, value, goal, ok, cpu=None):
        if value is not None:
            row = {"target": name, "measured": round(value, 3), "goal": goal, "met": bool(ok(value))}
            if cpu is not None:
                row["measured_cpu_time"] = round(cpu, 3)
            rows.append(row)

    def mem(a, b, field="peak_above_model"):
        return _ratio(m.get(a, {}).get(field), m.get(b, {}).get(field))

    def timed(a, b):
        return paired_ratio(m, a, b), paired_ratio(m, a, b, "cpu_s")

    prompts = result["config"]["prompts"]
    add("training step vs reference rule, same inputs", *timed("svd", "reference")[:1], "<= 0.95",
        lambda v: v <= 0.95, cpu=timed("svd", "reference")[1])  # fmt: skip
    goal = {100: 0.70, 1000: 0.35}.get(prompts)
    add(
        f"training step, full recipe, {prompts} prompts (ours longest-padded, reference 77)",
        timed("svd", "reference_77")[0],
        f"<= {goal}" if goal else "(no target at this prompt count)",
        (lambda v: v <= goal) if goal else (lambda v: True),
        cpu=timed("svd", "reference_77")[1],
    )
    add(
        "peak training memory vs reference rule, same inputs",
        mem("svd", "reference"),
        "<= 1.0",
        lambda v: v <= 1.0,
    )
    add(
        "peak training memory vs reference rule at 77 tokens",
        mem("svd", "reference_77"),
        "<= 1.0",
        lambda v: v <= 1.0,
    )
    add("peak training memory incl. model vs reference rule, same inputs", mem("svd", "reference", "peak_total"),
        "(reported)", lambda v: True)  # fmt: skip
    add("peak training memory vs LoRA", mem("svd", "lora"), "(reported)", lambda v: True)
    for name, label in (("eval_svd", "unmerged"), ("eval_svd_merged", "merged")):
        wall, cpu = timed("eval_base", name)
        add(f"eval throughput, {label} vs base", wall, ">= 0.97", lambda v: v >= 0.97, cpu=cpu)
    return rows


def render_targets(rows: list[dict]) -> str:
    lines = ["| target | measured (wall time) | CPU time | goal | met |", "|---|---|---|---|---|"]
    for t in rows:
        lines.append(
            f"| {t['target']} | {t['measured']} | {t.get('measured_cpu_time', '-')} | {t['goal']} "
            f"| {'yes' if t['met'] else 'NO'} |"
        )
    return "\n" + "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu' or 'cuda'")
    p.add_argument(
        "--blocks", type=int, default=None, help="blocks per encoder (default: 2 on CPU, 12 on GPU)"
    )
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 16 on CPU, 32 on GPU)")
    p.add_argument("--prompts", type=int, default=100, help="class prompts encoded every training step")
    p.add_argument(
        "--pad-to",
        type=int,
        default=None,
        help="pad everyone's prompts (but reference_77's) to this length, not the longest",
    )
    p.add_argument(
        "--precision",
        choices=sorted(_PRECISIONS),
        default=None,
        help="autocast dtype (default: fp32 on CPU, bf16 on GPU)",
    )
    p.add_argument("--vision-width", type=int, default=768)
    p.add_argument("--text-width", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=49408)
    p.add_argument("--methods", default=",".join(TRAIN_METHODS + EVAL_METHODS), help="comma-separated subset")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per method")
    p.add_argument("--steps", type=int, default=7, help="timed rounds (one step of every method per round)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument(
        "--no-overhead", action="store_true", help="skip the per-call wrapper overhead measurement"
    )
    p.add_argument("--profile", default=None, help="print a torch.profiler table of one step of this method")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads on the CPU")
    p.add_argument("--factor-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--measure-memory-of", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    args.blocks = args.blocks or (12 if gpu else 2)
    args.batch = args.batch or (32 if gpu else 16)
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(TRAIN_METHODS + EVAL_METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(TRAIN_METHODS + EVAL_METHODS)}")
    return args


def _forwarded_argv(args) -> list[str]:
    return [
        "--device", args.device, "--blocks", str(args.blocks), "--image-size", str(args.image_size),
        "--batch", str(args.batch), "--prompts", str(args.prompts), "--precision", args.precision,
        *(["--pad-to", str(args.pad_to)] if args.pad_to else []),
        "--vision-width", str(args.vision_width), "--text-width", str(args.text_width),
        "--vocab-size", str(args.vocab_size), "--seed", str(args.seed), "--memory-steps", str(args.memory_steps),
        *(["--threads", str(args.threads)] if args.threads else []),
    ]  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.measure_memory_of:
        print(json.dumps(measure_memory(args.measure_memory_of, args)))
        return {}
    if args.profile:
        print(profile_method(args.profile, args, device))
        return {}

    config = {k: v for k, v in vars(args).items() if k not in ("factor_dir", "measure_memory_of", "profile")}
    result = {
        "benchmark": "train_step",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(device),
        "command": "python benchmarks/bench_train_step.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": config,
        "text_tokens": {
            "longest": None,
            "reference_77": _CONTEXT,
        },
        "methods": {},
    }
    with tempfile.TemporaryDirectory() as factor_dir:
        base = build_base(args, device)
        inputs = make_inputs(args, device)
        result["text_tokens"]["longest"] = int(inputs["text_longest"]["input_ids"].shape[1])
        runners = {}
        for method in tqdm(args.methods, desc="building"):
            runners[method] = Runner(method, base, inputs, args, device, factor_dir)
        for runner in runners.values():
            for _ in range(args.warmup):
                runner.step()
        times = {m: [] for m in runners}
        cpu_times = {m: [] for m in runners}
        order = list(runners)
        for r in tqdm(range(args.steps), desc="timing rounds"):
            rotated = order[r % len(order) :] + order[: r % len(order)]
            for method in rotated:
                wall, cpu = runners[method].step()
                times[method].append(wall)
                cpu_times[method].append(cpu)
        for method, runner in runners.items():
            med = statistics.median(times[method])
            entry = {
                "label": METHOD_LABELS[method],
                "times_s": [round(t, 5) for t in times[method]],
                "cpu_s": [round(t, 5) for t in cpu_times[method]],
                "median_s": med,
                "images_per_s": args.batch / med,
                "trainable_params": sum(p.numel() for p in runner.trainable),
            }
            if not runner.is_eval:
                entry["saved_bytes"] = saved_bytes(runner.peft_model, runner.clip)
            result["methods"][method] = entry
        del runners, base
        gc.collect()

        if not args.no_memory:
            forwarded = _forwarded_argv(args)
            # training methods only: evaluation memory is the model's plus one batch of activations
            for method in tqdm(
                [m for m in args.methods if m in TRAIN_METHODS], desc="memory (one process each)"
            ):
                result["methods"][method].update(memory_in_subprocess(method, forwarded, factor_dir))

    if not args.no_overhead:
        result["wrapper_overhead_us"] = wrapper_overhead_us()
    result["forms_chosen"] = forms_chosen(args)
    result["targets"] = targets(result)
    result["table"] = render_table(result)

    print(f"\n{result['machine']}; {args.blocks} blocks per encoder, {args.image_size}px, batch {args.batch}, "
          f"{args.prompts} prompts ({result['text_tokens']['longest']} tokens longest-padded, 77 for reference_77), "
          f"{args.precision}, {args.steps} rounds\n")  # fmt: skip
    print(result["table"])
    print(render_targets(result["targets"]))
    if "wrapper_overhead_us" in result:
        print("\nper-call overhead (us):", json.dumps(result["wrapper_overhead_us"]))
    print("forms chosen by peft-svd:", json.dumps(result["forms_chosen"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
