"""What only a CUDA GPU shows, in one call of under 8 minutes on one GPU, with no network and no
weights (every model is built from a config, with random weights; the data is the toy task's
words, selfrm/toy.py). Issue 27, item 7. Each section calls selfrm's own code (score_encoded,
pack_pairs through it, set_up / backward_global_batch / optimizer_step, scoring_model, score,
train.py itself) and records numbers, or its error, or why it was skipped:

  versions      torch, CUDA, cuDNN, NCCL, transformers, peft; is_bf16_supported with and without
                emulation; the sdpa back-ends enabled
  sdpa          the sdpa kernel chosen for the shared-prefix mask (profiled aten ops) and the peak
                memory of pm scoring at batch 32, 2,500-3,000 tokens a sequence, shared and
                unshared, bf16 weights as selfrm scores under --dtype=bf16: Llama 3, Qwen2,
                Mistral, Gemma-2 at their real widths, 2 layers
  shared        shared vs unshared scores on the device in fp32, bf16 and fp16 autocast on fp32
                weights, and bf16 on bf16 weights (scoring's under --dtype=bf16) (max difference,
                NaN count): the tests' real-like configs (tests/conftest.py), pm and rm
  head          the LM head's (pm) and score head's (rm) input shapes in training and scoring
                (the pm's through selfrm.modeling._Rows, which stands in for its head; the rm's
                a forward hook on the score head)
  fp16          fp16 with GradScaler and clipping against fp32 and bf16: a few steps on one batch
                (finite, the loss falls, the scaler's scale)
  fsdp_memory   FSDP2 through a one-rank process group (NCCL), a 0.53B Llama at 3072 tokens,
                gradient checkpointing, bf16: peak memory with 1 and 4 micro-steps per optimizer
                step (issue 27, defect 1), and the memory held between micro-steps
  fsdp_scoring  scoring under FSDP against the unsharded model (max probability difference)
  fsdp_resume   train.py under torchrun (one rank, FSDP), SIGKILL after its checkpoint, rerun:
                the final weights against an uninterrupted run (max weight difference)

    python bench/gpu_check.py --results_dir=DIR      # on a GPU machine: under 8 minutes
    python bench/gpu_check.py --quick                # a CPU smoke test of the code paths (~1-2 min)

Without CUDA it falls back by itself to the CPU (gloo, tiny sizes, fp32 and bf16 only) and
writes to /tmp: a CPU run is never saved as GPU figures. selfrm shards a model only when a run
has more than one rank (`cfg.fsdp and world.ddp`); on one GPU the FSDP sections make its one
rank take the multi-rank path from outside (OneRankGroup here; the train.py worker patches
Dist.ddp), so the code measured is the code 8 GPUs run. Each section is timed against
--budget_s and skipped, saying so, when its estimate would pass it; the JSON is rewritten
after every section, so a run cut short keeps what it measured.
"""
import time

START = time.time()  # the budget counts the imports too

import gc  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import ClassVar  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tqdm import tqdm  # noqa: E402

from selfrm import dist, scoring, toy, trainer  # noqa: E402
from selfrm.dist import Dist  # noqa: E402
from selfrm.settings import SettingsError, TrainSettings, cli, make, parse_args, setting  # noqa: E402

CUDA = torch.cuda.is_available()
# no progress bars in this report (scoring and training pass disable= themselves)
scoring.tqdm = lambda *args, **kwargs: tqdm(*args, **{**kwargs, "disable": True})


@dataclass
class CheckSettings:
    script: ClassVar[str] = "bench/gpu_check.py"
    quick: bool = setting(False, "tiny sizes (automatic without CUDA): a smoke test of the code paths")
    results_dir: str = setting("", "where the .json and .md go; default bench/results on CUDA, /tmp/selfrm-gpu-check without")
    name: str = setting("", "file name of the results, without extension; default gpu_check_<device>_<date>")
    work_dir: str = setting("", "scratch folder for models and runs (default: a new temporary folder)")
    budget_s: float = setting(450.0, "skip a section, saying so, when elapsed + its estimate would pass this")
    sections: str = setting("", "comma-separated sections to run (default: all)")


# ----------------------------------------------------------------------------- sizes

@dataclass
class Sizes:
    """What each section builds: the GPU's sizes, or the CPU smoke test's."""
    layers: int  # sdpa: decoder layers of the real-width models
    widths: bool  # sdpa: the real widths (False: the tiny real-like ones)
    score_pairs: int  # sdpa: pairs in the one scoring batch
    seq_len: tuple  # sdpa: (shortest, longest) sequence
    shared_pairs: int  # shared: pairs per architecture
    context: tuple  # shared: context tokens (shortest, longest)
    fp16_hidden: int
    fp16_layers: int
    fp16_steps: int
    llama: dict  # FSDP sections: the Llama's config fields
    max_length: int  # FSDP sections: tokens per sequence
    prompt_words: tuple  # FSDP sections: prompt length of the toy rows, in words (tokens)
    resume_steps: int  # fsdp_resume: optimizer steps (a checkpoint half-way)


GPU_SIZES = Sizes(layers=2, widths=True, score_pairs=32, seq_len=(2500, 3000), shared_pairs=16, context=(200, 1500),
                  fp16_hidden=256, fp16_layers=4, fp16_steps=10,
                  llama=dict(vocab_size=128256, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                             num_attention_heads=16, num_key_value_heads=4),
                  max_length=3072, prompt_words=(2950, 3100), resume_steps=6)
CPU_SIZES = Sizes(layers=2, widths=False, score_pairs=4, seq_len=(100, 150), shared_pairs=6, context=(20, 60),
                  fp16_hidden=64, fp16_layers=2, fp16_steps=4,
                  llama=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2),
                  max_length=128, prompt_words=(100, 140), resume_steps=4)
# seconds each section may take (the GPU's from a rough count of its work; the CPU's from a run here)
ESTIMATES = {"versions": (2, 2), "fsdp_memory": (40, 15), "fsdp_scoring": (45, 15), "fsdp_resume": (150, 90),
             "sdpa": (70, 20), "shared": (40, 25), "head": (15, 10), "fp16": (30, 15)}
NEEDS_CUDA = "skipped: needs CUDA"


# ----------------------------------------------------------------------------- helpers

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Memory:
    """Peak device memory of a block, above what was allocated when it began (None on the CPU)."""

    def __enter__(self):
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if CUDA:
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
            self.above_mb = self.peak_mb - self.base / 2**20
        else:
            self.peak_mb = self.above_mb = NEEDS_CUDA


def free_memory():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def sdpa_ops(prof):
    """{aten op: calls} of the attention ops a profile saw, and the back-end they name."""
    ops = {e.key: e.count for e in prof.key_averages()
           if e.key.startswith("aten::") and ("scaled_dot_product" in e.key or "attention" in e.key)}
    names = {"_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)", "_scaled_dot_product_flash_attention": "flash",
             "_scaled_dot_product_efficient_attention": "memory-efficient", "_scaled_dot_product_cudnn_attention": "cudnn",
             "_scaled_dot_product_attention_math": "math (unfused)",
             "_scaled_dot_product_fused_attention_overrideable": "overrideable"}
    chosen = sorted({label for key, label in names.items() for op in ops if op == f"aten::{key}"})
    if not chosen:
        chosen = ["none: no sdpa call (eager attention: matmul + softmax)"] if "aten::scaled_dot_product_attention" not in ops \
            else ["sdpa called, back-end op not seen"]
    return ops, chosen


def profiled(fn):
    """fn()'s result, the attention ops it ran, the warnings it raised, its peak memory and time."""
    from torch.profiler import ProfilerActivity, profile
    with warnings.catch_warnings(record=True) as caught, Memory() as mem:
        warnings.simplefilter("always")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.time()
            out = fn()
            seconds = time.time() - start
    ops, chosen = sdpa_ops(prof)
    said = sorted({str(w.message)[:200] for w in caught})
    return out, {"sdpa_backend": chosen, "attention_ops": ops, "peak_mb": mem.peak_mb, "above_weights_mb": mem.above_mb,
                 "seconds": seconds, "warnings": said}


def max_diff(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    both = np.isfinite(a) & np.isfinite(b)
    return float(np.abs(a[both] - b[both]).max()) if both.any() else None


def nan_count(scores):
    return int(sum(np.isnan(np.asarray(v, dtype=np.float64)).sum() for v in scores.values()))


def compare(shared, unshared):
    """Max |shared - unshared| per score array, and the NaN counts of both."""
    return {"max_diff": {k: max_diff(shared[k], unshared[k]) for k in unshared},
            "nan_shared": nan_count(shared), "nan_unshared": nan_count(unshared)}


def token_range(pairs):
    """[shortest, longest] sequence of (ids, ids) pairs."""
    lengths = [len(ids) for pair in pairs for ids in pair]
    return [min(lengths), max(lengths)]


def prefix_pairs(n, lengths, vocab, seed, shared_share=(0.6, 0.85)):
    """n pairs of synthetic id lists, each sequence `lengths` long (a range), the two of a pair
    sharing a prefix of shared_share of the shorter: the shape of a pm pair's two orders."""
    g = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        n1, n2 = (int(g.integers(lengths[0], lengths[1] + 1)) for _ in range(2))
        p = int(min(n1, n2) * g.uniform(*shared_share))
        prefix = g.integers(5, vocab, p).tolist()
        pairs.append(tuple(prefix + g.integers(5, vocab, n - p).tolist() for n in (n1, n2)))
    return pairs


# ----------------------------------------------------------------------------- models from configs

def real_like_config(arch, vocab_size, kind, layers=2, widths=False):
    """The architectures' configs with every field that changes behaviour kept (tests/conftest.py's
    real_like_config: 2 layers, hidden 64), or at the real checkpoints' widths with few layers."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config
    tiny = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    real = {"llama3": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
            "qwen2": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4),
            "mistral": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
            "gemma2": dict(hidden_size=3584, intermediate_size=14336, num_attention_heads=16, num_key_value_heads=8)}
    common = dict(vocab_size=vocab_size, num_hidden_layers=layers, max_position_embeddings=8192, dtype="bfloat16",
                  **(real[arch] if widths else tiny))
    window = 4096 if widths else 8
    if kind == "rm":
        common["num_labels"] = 1
    if arch == "llama3":  # grouped-query attention, llama3 rope scaling, untied head
        return LlamaConfig(**common, tie_word_embeddings=False, rope_theta=500000.0,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64 if not widths else 8192})
    if arch == "gemma2":  # tied embeddings, soft-capping of logits and attention, sliding window
        return Gemma2Config(**common, head_dim=256 if widths else 16, tie_word_embeddings=True,
                            final_logit_softcapping=30.0, attn_logit_softcapping=50.0, sliding_window=window,
                            query_pre_attn_scalar=256 if widths else 16)
    if arch == "mistral":  # sliding window
        return MistralConfig(**common, sliding_window=window, tie_word_embeddings=False)
    if arch == "qwen2":  # bias on q/k/v, tied embeddings
        return Qwen2Config(**common, tie_word_embeddings=True)
    raise ValueError(arch)


# tests/test_prefix.py's variants, where what the layout must keep shows in the numbers
VARIANTS = {"gemma2-capped": ("gemma2", dict(attn_logit_softcapping=1.0, query_pre_attn_scalar=4)),
            "qwen2-sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1))}


def build(arch, kind, vocab_size, pad_id, device, layers=2, widths=False, attn=None):
    """A PreferenceModel (pm) or RewardModel (rm) of `arch`, fp32 weights (training's master
    weights; scoring's under fp32 and fp16: bf16_weights casts them for bf16), random init
    from seed 0, built on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from selfrm.modeling import PreferenceModel, RewardModel
    base, overrides = VARIANTS.get(arch, (arch, {}))
    config = real_like_config(base, vocab_size, kind, layers, widths)
    if overrides:
        config = type(config)(**{**{k: v for k, v in config.to_dict().items() if k != "layer_types"}, **overrides})
    config.pad_token_id = pad_id
    torch.manual_seed(0)
    auto = AutoModelForCausalLM if kind == "pm" else AutoModelForSequenceClassification
    with torch.device(device):
        hf = auto.from_config(config, dtype=torch.float32, **({"attn_implementation": attn} if attn else {}))
    if arch == "gemma2-capped":  # scores large enough to reach the cap
        with torch.no_grad():
            for name, weight in hf.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    weight.mul_(20)
    return (PreferenceModel if kind == "pm" else RewardModel)(hf).eval()


def bf16_weights(model):
    """`model`, built in fp32, as selfrm scores under --dtype=bf16 without FSDP (scoring_model:
    load_model(dtype=bf16)): cast to bf16 in place, but for the rotary embeddings' inv_freq
    buffers, which transformers computes in fp32 whatever the dtype and from_pretrained keeps
    fp32 (cast, they would move every position)."""
    kept = {name: b for name, b in model.named_buffers() if name.endswith("inv_freq")}
    model.to(torch.bfloat16)
    for name, b in kept.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = b
    return model


def fsdp_llama(sizes, tokenizer, device):
    """The FSDP sections' pm: a Llama 3-shaped model (GQA, untied head, 128k vocabulary at the
    GPU's size: 0.53B parameters), the toy tokenizer's special ids."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from selfrm.modeling import PreferenceModel
    config = LlamaConfig(**sizes.llama, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(device):
        return PreferenceModel(LlamaForCausalLM(config))


# ----------------------------------------------------------------------------- the run's context

@dataclass
class OneRankGroup(Dist):
    """One rank that takes selfrm's multi-rank paths (`world.ddp`): FSDP sharding, the
    collectives of scoring and checkpoints, in a process group of one."""

    @property
    def ddp(self):
        return True


def scratch_root():
    """/dev/shm when it has room for fsdp_resume's checkpoints and models (about 20 GB at the GPU's
    size: a disk of unknown speed would take the budget), else the temporary folder."""
    import shutil
    return "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 40e9 else None


class Context:
    def __init__(self, cfg):
        self.cfg, self.quick = cfg, cfg.quick or not CUDA
        self.sizes = CPU_SIZES if self.quick else GPU_SIZES
        self.device = torch.device("cuda", 0) if CUDA else torch.device("cpu")
        self.work = cfg.work_dir or tempfile.mkdtemp(prefix="selfrm-gpu-check-", dir=scratch_root())
        os.makedirs(self.work, exist_ok=True)
        self.dtypes = ("fp32", "bf16", "fp16") if CUDA else ("fp32", "bf16")
        self._folder = self._rows = None
        self.later_s = 0  # the estimates of the sections still to run after this one (main sets it)

    def remaining(self):
        return self.cfg.budget_s - (time.time() - START)

    def group(self):
        """The one-rank process group (NCCL on CUDA, gloo on the CPU), started once."""
        if not torch.distributed.is_initialized():
            if CUDA:
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group("nccl" if CUDA else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                                 rank=0, world_size=1, device_id=self.device if CUDA else None)
        return OneRankGroup(device=self.device)

    def rows_file(self):
        """64 toy-task pairs whose prompts are long runs of the task's words: about
        sizes.max_length tokens a sequence (the longest are truncated, as a real run's are)."""
        if self._rows is None:
            g = np.random.default_rng(0)
            words = toy.words()
            rows = [{**row, "prompt": " ".join(g.choice(words, int(g.integers(*self.sizes.prompt_words))))}
                    for row in toy.make_pairs(0, 64)]
            self._rows = os.path.join(self.work, "long_pairs.jsonl")
            with open(self._rows, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        return self._rows

    def model_folder(self):
        """fsdp_llama saved as a hub checkpoint is (bf16 weights, "dtype": "bfloat16"), with the
        toy tokenizer: what train.py and scoring_model load."""
        if self._folder is None:
            tokenizer = toy.build_tokenizer()
            model = fsdp_llama(self.sizes, tokenizer, self.device)
            folder = os.path.join(self.work, "llama-base")
            model.hf.to("cpu", torch.bfloat16).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            del model
            free_memory()
            self._folder = folder
        return self._folder


# ----------------------------------------------------------------------------- the sections

def check_versions(ctx):
    import transformers
    import peft
    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "cuda_available": CUDA, "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if CUDA else None}
    if CUDA:
        props = torch.cuda.get_device_properties(0)
        out.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   memory_gb=props.total_memory / 1e9, nccl=".".join(map(str, torch.cuda.nccl.version()))
                   if isinstance(torch.cuda.nccl.version(), tuple) else str(torch.cuda.nccl.version()),
                   is_bf16_supported=torch.cuda.is_bf16_supported(),
                   is_bf16_supported_without_emulation=torch.cuda.is_bf16_supported(including_emulation=False),
                   sdpa_enabled={"flash": torch.backends.cuda.flash_sdp_enabled(),
                                 "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                 "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                                 "math": torch.backends.cuda.math_sdp_enabled()},
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    else:
        out.update(device=f"cpu ({platform.processor() or platform.machine()})", is_bf16_supported=NEEDS_CUDA,
                   is_bf16_supported_without_emulation=NEEDS_CUDA)
    cfg = make(TrainSettings)
    out["dtype_auto_resolves_to"] = str(trainer.autocast_dtype(cfg, ctx.device) or "fp32 (no autocast)")
    return out


def check_sdpa(ctx):
    """pm scoring (score_encoded, both layouts) of one batch of long pairs per architecture, and
    Gemma-2 once more with sdpa asked for, when its default is another attention."""
    out = {}
    default_attention = {}
    for arch, attn in [("llama3", None), ("qwen2", None), ("mistral", None), ("gemma2", None), ("gemma2", "sdpa")]:
        label = arch if attn is None else f"{arch} ({attn} asked for)"
        if attn and default_attention.get(arch) == attn:  # the default run was this one already
            continue
        if ctx.remaining() < 10:
            out[label] = "skipped: the time budget is spent"
            continue
        try:
            out[label] = sdpa_run(ctx, arch, attn, default_attention)
        except Exception as e:  # one architecture's error, and the next one runs
            out[label] = f"error: {type(e).__name__}: {str(e)[:300]}"
        free_memory()
    return out


def sdpa_run(ctx, arch, attn, default_attention):
    from selfrm.scoring import score_encoded
    from selfrm.sharing import SPLIT, shared_length
    s, amp = ctx.sizes, torch.bfloat16
    vocab = {"llama3": 128256, "qwen2": 152064, "mistral": 32768, "gemma2": 256000}[arch] if s.widths else 512
    model = bf16_weights(build(arch, "pm", vocab, 0, ctx.device, s.layers, s.widths, attn))
    default_attention.setdefault(arch, model.hf.config._attn_implementation.removeprefix(SPLIT))
    pairs = prefix_pairs(s.score_pairs, s.seq_len, min(vocab, 30000), seed=1)
    world, label_ids = Dist(device=ctx.device), {"A": 7, "B": 8}
    score = lambda encoded, share: score_encoded(model, encoded, 0, label_ids, world, s.score_pairs, amp,
                                                 desc="sdpa", share_prefix=share)
    score(pairs[:2], True), score(pairs[:2], False)  # warm-up: kernels chosen, cuBLAS started
    shared, shared_run = profiled(lambda: score(pairs, True))
    unshared, unshared_run = profiled(lambda: score(pairs, False))
    rows = [len(a) + len(b) - shared_length(a, b) for a, b in pairs]
    return {"attention": model.hf.config._attn_implementation.removeprefix(SPLIT),
            "weights": "bf16, bf16 autocast (selfrm's scoring under --dtype=bf16)", "pairs": len(pairs),
            "sequence_tokens": token_range(pairs),
            "shared_row_tokens": [min(rows), max(rows)],
            "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
            "shared": shared_run, "unshared": unshared_run, **compare(shared, unshared)}


# shared's cases: (autocast dtype, weights); fp32 weights as training holds them (and scoring under
# fp32 and fp16), bf16 weights as scoring_model loads them under --dtype=bf16 (last: the cast is in place)
SHARED_CASES = {"fp32": (None, "fp32"), "bf16": (torch.bfloat16, "fp32"), "fp16": (torch.float16, "fp32"),
                "bf16_weights": (torch.bfloat16, "bf16")}


def check_shared(ctx):
    """Shared vs unshared scores per architecture, kind and dtype (SHARED_CASES), and each
    against fp32 unshared."""
    from selfrm.scoring import score_encoded
    from selfrm.sharing import SPLIT
    s = ctx.sizes
    out = {}
    world = Dist(device=ctx.device)
    g = np.random.default_rng(2)
    pairs = []
    for _ in range(s.shared_pairs):  # a long shared context, then two responses, some with a common start
        context = g.integers(5, 500, int(g.integers(*s.context))).tolist() + [3]
        common = g.integers(5, 500, int(g.integers(0, 4))).tolist()
        pairs.append(tuple(context + common + g.integers(5, 500, int(g.integers(1, 60))).tolist() + [4] for _ in range(2)))
    for arch in ("llama3", "qwen2", "mistral", "gemma2", "gemma2-capped", "qwen2-sliding"):
        for kind in ("pm", "rm"):
            model = build(arch, kind, 512, 0, ctx.device)
            label_ids = {"A": 7, "B": 8} if kind == "pm" else None
            runs, reference = {}, None
            for name, (amp, weights) in SHARED_CASES.items():
                if name.removesuffix("_weights") not in ctx.dtypes:
                    runs[name] = NEEDS_CUDA
                    continue
                if weights == "bf16":
                    bf16_weights(model)
                unshared = score_encoded(model, pairs, 0, label_ids, world, 8, amp, share_prefix=False)
                shared, run = profiled(lambda: score_encoded(model, pairs, 0, label_ids, world, 8, amp, share_prefix=True))
                reference = unshared if reference is None else reference
                runs[name] = {**compare(shared, unshared), "max_diff_vs_fp32_unshared":
                              max_diff(shared["prob_a"], reference["prob_a"]), "sdpa_backend": run["sdpa_backend"]}
            out[f"{arch} {kind}"] = {"attention": model.hf.config._attn_implementation.removeprefix(SPLIT),
                                     **runs}
            del model
    out["pairs"] = {"n": len(pairs), "tokens": token_range(pairs), "sliding_window": 8}
    return out


def toy_examples(kind, n, tokenizer, max_length=64):
    """Training examples (Encoder.encode_train) and scoring pairs (encode_score) of the toy task."""
    from selfrm.encoding import Encoder
    from selfrm.formats import Pair
    pairs = [Pair([{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"]) for r in toy.make_pairs(0, n)]
    encoder = Encoder(tokenizer, kind, max_length)
    examples = encoder.encode_train(pairs, np.arange(n) % 2 == 1)
    scored = encoder.encode_score([p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs])
    return examples, scored, encoder.label_ids or None


def check_head(ctx):
    """The head's input shapes and dtypes in one training step (set_up, backward_global_batch:
    bf16 autocast) and in scoring (score_encoded, both layouts). The pm's head is read through
    selfrm.modeling._Rows, which PreferenceModel.forward puts in the head's place for the call
    (the head's own forward, and a hook on it, are not called): its forward is wrapped from
    outside. The rm's score head is called itself: a forward hook on it."""
    from selfrm import modeling
    from selfrm.scoring import score_encoded
    tokenizer = toy.build_tokenizer(chat=True)
    out = {}
    for kind in ("pm", "rm"):
        model = build("llama3", kind, len(tokenizer), tokenizer.pad_token_id, ctx.device).train()
        head = model.hf.get_output_embeddings() if kind == "pm" else model.hf.score
        phase, seen = ["train"], {}

        def record(hidden, output, rows=""):
            key = f"{phase[0]}: input {tuple(hidden.shape)} {str(hidden.dtype)[6:]}{rows} -> output {str(output.dtype)[6:]}"
            seen[key] = seen.get(key, 0) + 1
        real_rows = modeling._Rows.forward

        def rows_forward(self, hidden):
            output = real_rows(self, hidden)
            record(hidden, output, ", token_ids None (every row)" if self.token_ids is None else ", token_ids given")
            return output
        if kind == "pm":
            modeling._Rows.forward = rows_forward
        handle = None if kind == "pm" else head.register_forward_hook(lambda module, args, output: record(args[0], output))
        try:
            examples, scoring_ids, label_ids = toy_examples(kind, 8, tokenizer)
            cfg = make(TrainSettings, model_type=kind, dtype="bf16", global_batch_size=8, micro_batch_size=4, lr=1e-4)
            s = trainer.set_up(cfg, model, tokenizer, Dist(device=ctx.device), label_ids)
            batch = s.collate(examples[:4])
            trainer.backward_global_batch(s, [examples[:4], examples[4:]], 8)
            lengths = [len(e["input_ids"]) if kind == "pm" else len(e["chosen_ids"]) for e in examples]
            for share in (False, True):
                phase[0] = f"score ({'shared' if share else 'unshared'}, 8 pairs)"
                score_encoded(model, scoring_ids, tokenizer.pad_token_id, label_ids, Dist(device=ctx.device), 8,
                              torch.bfloat16, share_prefix=share)
        finally:
            modeling._Rows.forward = real_rows
            if handle is not None:
                handle.remove()
        out[kind] = {"head": type(head).__name__ + (", read through selfrm.modeling._Rows" if kind == "pm" else ""),
                     "train_micro_batch": {k: list(v.shape) for k, v in batch.items()},
                     "train_share_prefix": "segment_ids" in batch, "sequence_tokens": [min(lengths), max(lengths)],
                     "calls": seen}
        del model, s
    return out


def check_fp16(ctx):
    """The same steps on one batch (16 pairs, 4 micro-steps of 4) in fp32, bf16 and fp16: the
    trainer's own set_up, backward_global_batch and optimizer_step (clipping at 1.0, after
    unscaling fp16's gradients); the grad norm read off clip_grad_norm_."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from selfrm.modeling import PreferenceModel
    s = ctx.sizes
    tokenizer = toy.build_tokenizer()
    examples, _, label_ids = toy_examples("pm", 16, tokenizer)
    out = {}
    for name in ("fp32", "bf16", "fp16"):
        if name not in ctx.dtypes:
            out[name] = NEEDS_CUDA
            continue
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=32000 if CUDA else 512, hidden_size=s.fp16_hidden, intermediate_size=4 * s.fp16_hidden,
                             num_hidden_layers=s.fp16_layers, num_attention_heads=8 if CUDA else 4, num_key_value_heads=4,
                             pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
        model = PreferenceModel(LlamaForCausalLM(config))
        cfg = make(TrainSettings, dtype=name, global_batch_size=16, micro_batch_size=4, lr=1e-3, warmup_steps=0,
                   schedule="constant", grad_clip=1.0)
        setup = trainer.set_up(cfg, model, tokenizer, Dist(device=ctx.device), label_ids)
        norms, real_clip = [], torch.nn.utils.clip_grad_norm_
        torch.nn.utils.clip_grad_norm_ = lambda *a, **k: norms.append(float(real_clip(*a, **k))) or norms[-1]
        try:
            steps = []
            for step in range(s.fp16_steps):
                before = setup.scaler.get_scale() if setup.scaler.is_enabled() else None
                micro = [[examples[i] for i in idx] for idx in trainer.micro_batches(np.arange(16), cfg, setup.world)]
                stats = trainer.backward_global_batch(setup, micro, 16)
                trainer.optimizer_step(setup, cfg, step, s.fp16_steps)
                after = setup.scaler.get_scale() if setup.scaler.is_enabled() else None
                loss = float(stats[0]) / 16
                steps.append({"loss": loss, "grad_norm_before_clip": norms[-1] if norms else None, "scale": after,
                              "skipped": bool(before is not None and after < before)})
        finally:
            torch.nn.utils.clip_grad_norm_ = real_clip
        losses = [r["loss"] for r in steps]
        out[name] = {"steps": steps, "all_finite": bool(np.isfinite(losses).all()), "loss_first": losses[0],
                     "loss_last": losses[-1], "loss_falls": losses[-1] < losses[0],
                     "skipped_steps": sum(r["skipped"] for r in steps)}
        del model, setup
        free_memory()
    return out


def check_fsdp_memory(ctx):
    """Two optimizer steps each of 1 and of 4 micro-steps (micro-batch 1 at sizes.max_length
    tokens), FSDP2 bf16 with gradient checkpointing, through set_up and the trainer's step.
    The memory at the start of every micro-step is read by wrapping trainer.gradient_sync."""
    from selfrm.formats import load_pairs
    from selfrm.steps import encode_training
    world = ctx.group()
    tokenizer = toy.build_tokenizer()
    s = ctx.sizes
    base = make(TrainSettings, model_type="pm", max_length=s.max_length, fsdp=True, dtype="bf16",
                gradient_checkpointing=True, micro_batch_size=1, lr=1e-5, warmup_steps=0)
    examples, encoder = encode_training(base, tokenizer, load_pairs(ctx.rows_file()))
    lengths = [len(e["input_ids"]) for e in examples]
    out = {"sequence_tokens": [min(lengths), max(lengths)], "truncated": encoder.truncated}
    real_sync = trainer.gradient_sync
    for micro_steps in (1, 4):
        cfg = make(TrainSettings, **{**base.__dict__, "global_batch_size": micro_steps})
        model = fsdp_llama(s, tokenizer, ctx.device)
        n_params = sum(p.numel() for p in model.parameters())
        with Memory() as set_up_mem:  # sharding, and the full state it is filled from
            setup = trainer.set_up(cfg, model, tokenizer, world, encoder.label_ids)
        at_micro = []

        def sync_and_read(model, last):  # called before each micro-step's forward: what the last ones left
            at_micro.append(torch.cuda.memory_allocated() / 2**20 if CUDA else None)
            return real_sync(model, last)
        trainer.gradient_sync = sync_and_read
        try:
            steps = []
            for step in range(2):
                at_micro.clear()
                batch = np.arange(step * micro_steps, (step + 1) * micro_steps)
                micro = [[examples[i] for i in idx] for idx in trainer.micro_batches(batch, cfg, world)]
                with Memory() as mem:
                    stats = trainer.backward_global_batch(setup, micro, len(batch),
                                                          trainer.most_micro_batches(batch, cfg, world))
                    trainer.optimizer_step(setup, cfg, step, 2)
                steps.append({"loss": float(stats[0]) / len(batch), "peak_mb": mem.peak_mb,
                              "allocated_at_each_micro_step_mb": list(at_micro),
                              "allocated_after_step_mb": torch.cuda.memory_allocated() / 2**20 if CUDA else NEEDS_CUDA})
        finally:
            trainer.gradient_sync = real_sync
        out[f"{micro_steps}_micro_steps"] = {"params": n_params, "set_up_peak_mb": set_up_mem.peak_mb,
                                             "steps": steps, "peak_mb": max((r["peak_mb"] for r in steps), default=None)
                                             if CUDA else NEEDS_CUDA}
        del model, setup
        free_memory()
    if CUDA:
        one, four = out["1_micro_steps"]["peak_mb"], out["4_micro_steps"]["peak_mb"]
        out["peak_growth_mb"] = four - one
        out["fp32_gradient_mb"] = out["1_micro_steps"]["params"] * 4 / 2**20
    return out


def inference_mode_probe(ctx):
    """Whether FSDP2 on this one-rank group survives a first forward under torch.inference_mode
    (two Linear layers). With torch 2.13 and gloo it does not: the buffers of the first forward
    become inference tensors, and every later forward fails ("Inference tensors do not track
    version counter"); a first forward under no_grad avoids it; two ranks are not affected."""
    from torch.distributed.fsdp import fully_shard
    ctx.group()
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
        x = torch.randn(2, 8)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    try:
        with torch.inference_mode():
            model(x)
        return "a first forward under inference_mode works"
    except RuntimeError as e:
        return f"a first forward under inference_mode fails: {str(e)[:200]}"


def check_fsdp_scoring(ctx):
    """The saved 0.53B Llama scored by scoring.score with scoring_model's model: sharded on the
    one-rank group (bf16 compute), and unsharded (bf16 weights, as scoring_model loads them,
    and fp32). The sharded model runs one idle forward under no_grad first: see
    inference_mode_probe."""
    from selfrm.formats import load_pairs
    from selfrm.scoring import encode_pairs, score
    from selfrm.steps import scoring_model
    folder, s = ctx.model_folder(), ctx.sizes
    pairs = load_pairs(ctx.rows_file())[:8 if ctx.quick else 32]
    runs, probe = {}, inference_mode_probe(ctx)
    for name, fsdp, dtype in (("fsdp_bf16", True, "bf16"), ("unsharded_bf16", False, "bf16"), ("unsharded_fp32", False, "fp32")):
        cfg = make(TrainSettings, model=folder, model_type="pm", max_length=s.max_length, fsdp=fsdp, dtype=dtype,
                   batch_size=16)
        world = ctx.group() if fsdp else Dist(device=ctx.device)
        with Memory() as mem:
            model, tokenizer = scoring_model(cfg, world, folder)
            stored = str(next(model.parameters()).dtype)[6:]  # as loaded (under FSDP: the shards)
            encoded = encode_pairs(cfg, tokenizer, pairs)
            if fsdp:
                idle = torch.full((2, 1), tokenizer.pad_token_id, dtype=torch.long, device=ctx.device)
                token_ids = torch.tensor([encoded[1]["A"], encoded[1]["B"]], device=ctx.device)
                with torch.no_grad():
                    model.eval()(idle, torch.ones_like(idle), torch.zeros(2, dtype=torch.long, device=ctx.device),
                                 token_ids=token_ids)
            start = time.time()
            scores = score(cfg, world, model, tokenizer, encoded, name)
            seconds = time.time() - start
        runs[name] = {"scores": scores, "peak_mb": mem.peak_mb, "seconds": seconds,
                      "weights_dtype": stored}
        del model
        free_memory()
    ids = encoded[0]
    out = {"one_rank_inference_mode": probe, "pairs": len(pairs), "tokens_per_sequence": token_range(ids)}
    scores = {name: run.pop("scores") for name, run in runs.items()}
    for name, run in runs.items():
        out[name] = {**run, "nan": nan_count(scores[name]),
                     **{f"max_prob_diff_vs_{ref}": max_diff(scores[name]["prob_a"], scores[ref]["prob_a"])
                        for ref in ("unsharded_bf16", "unsharded_fp32")},
                     "max_order_prob_diff_vs_unsharded_bf16": max_diff(scores[name]["prob_a_orders"],
                                                                       scores["unsharded_bf16"]["prob_a_orders"])}
    return out


# ---- fsdp_resume: train.py in subprocesses

def train_command(ctx, out_dir, save_every, marker=None):
    s = ctx.sizes
    args = [f"--model={ctx.model_folder()}", "--model_type=pm", f"--train_file={ctx.rows_file()}",
            f"--max_length={s.max_length}", "--fsdp=true", "--dtype=bf16", "--gradient_checkpointing=true",
            "--global_batch_size=4", "--micro_batch_size=1", f"--max_steps={s.resume_steps}", "--lr=1e-5",
            "--warmup_steps=1", "--log_every=1", f"--save_every={save_every}", f"--out_dir={out_dir}"]
    worker = [__file__, "--train_worker"] + ([f"--pause_marker={marker}"] if marker else []) + ["--"] + args
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}", *worker]


RUN_CAP_S = 150  # one train.py run of fsdp_resume (about 30 s expected): a hung one leaves time for the rest


def start_train(ctx, command, name):
    """torchrun in a session of its own (its process group: torchrun and its worker, killed
    together), its stdout and stderr to files in the work folder (a pipe no one reads while
    waiting would fill and block it)."""
    logs = tuple(os.path.join(ctx.work, f"{name}.{ext}") for ext in ("stdout", "stderr"))
    with open(logs[0], "w") as out, open(logs[1], "w") as err:
        proc = subprocess.Popen(command, cwd=ROOT, env=worker_env(), stdout=out, stderr=err, start_new_session=True)
    return proc, logs


def end_group(proc):
    """SIGKILL to proc's whole process group, so that no worker is left holding the GPU."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def tail(path, n):
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def run_train(ctx, command, name):
    """A train.py run to its end; a failure (or RUN_CAP_S, or the budget) is the section's error."""
    start, limit = time.time(), max(min(ctx.remaining(), RUN_CAP_S), 10)
    proc, (out, err) = start_train(ctx, command, name)
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"train.py ran past {limit:.0f} s (its process group killed): {tail(err, 1500)}") from None
    finally:
        if proc.poll() is None:
            end_group(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py exited with {proc.returncode}: {tail(err, 1500)}")
    return {"returncode": proc.returncode, "seconds": time.time() - start,
            "stderr_tail": tail(err, 1500), "stdout_tail": tail(out, 800)}


def worker_env():
    return {**os.environ, "PYTHONUNBUFFERED": "1", **({} if CUDA else {"OMP_NUM_THREADS": "1"})}


def weights(folder):
    from safetensors.torch import load_file
    state = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        state.update(load_file(f))
    return state


def losses_of(out_dir):
    path = os.path.join(out_dir, "train_log.jsonl")
    return [json.loads(line)["loss"] for line in open(path)] if os.path.exists(path) else []


def check_fsdp_resume(ctx):
    """An uninterrupted run; a run killed (SIGKILL, the worker's pid) right after its checkpoint
    at half its steps; the same command again, which resumes. Max weight difference of the
    final models; and, when time is left, a second uninterrupted run: the floor that CUDA's
    nondeterministic kernels set."""
    s = ctx.sizes
    half = s.resume_steps // 2
    ctx.model_folder(), ctx.rows_file()
    free_memory()  # the parent's cached blocks are free for the workers
    out = {"steps": s.resume_steps, "checkpoint_at": half}
    ref_dir, run_dir = os.path.join(ctx.work, "resume-reference"), os.path.join(ctx.work, "resume-killed")
    out["reference"] = run_train(ctx, train_command(ctx, ref_dir, 0), "resume-reference")
    # the killed run: the worker pauses after writing its checkpoint and names its pid in the marker
    marker = os.path.join(ctx.work, "checkpoint-written.json")
    proc, (_, err_log) = start_train(ctx, train_command(ctx, run_dir, half, marker), "resume-killed")
    try:
        deadline = time.time() + max(min(ctx.remaining(), RUN_CAP_S), 10)
        while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        if not os.path.exists(marker):
            code = proc.poll()
            how = "still running at the deadline" if code is None else f"returncode {code}"
            raise RuntimeError(f"the killed run wrote no checkpoint ({how}): {tail(err_log, 1500)}")
        written = json.load(open(marker))
        state = os.path.join(run_dir, "checkpoint", "state.pt")
        os.kill(written["pid"], signal.SIGKILL)
        proc.wait(timeout=60)  # torchrun sees its worker die and exits
    finally:
        if proc.poll() is None:
            end_group(proc)
    err = tail(err_log, 600)
    out["killed"] = {"checkpoint_step": written["step"], "state_pt_existed": os.path.exists(state),
                     "checkpoint_files": sorted(os.listdir(os.path.dirname(state))),  # shards-*: FSDP's sharded checkpoint
                     "torchrun_returncode": proc.returncode, "model_saved": os.path.exists(os.path.join(run_dir, "model")),
                     "stderr_tail": err}
    out["resumed"] = run_train(ctx, train_command(ctx, run_dir, half), "resume-resumed")
    out["resumed"]["resume_line"] = next((line.strip() for line in (out["resumed"]["stdout_tail"] + out["resumed"]["stderr_tail"])
                                          .splitlines() if "resumed from" in line), None)
    ref, got = weights(os.path.join(ref_dir, "model")), weights(os.path.join(run_dir, "model"))
    out["same_keys"] = sorted(ref) == sorted(got)
    out["max_weight_diff"] = max(float((ref[k].float() - got[k].float()).abs().max()) for k in ref if k in got)
    out["losses_reference"], out["losses_resumed"] = losses_of(ref_dir), losses_of(run_dir)
    if ctx.remaining() - ctx.later_s > out["reference"]["seconds"] + 15:  # time the sections after this one keep
        again = os.path.join(ctx.work, "resume-reference-again")
        out["reference_again"] = run_train(ctx, train_command(ctx, again, 0), "resume-reference-again")
        out["max_weight_diff_two_uninterrupted_runs"] = max(
            float((ref[k].float() - v.float()).abs().max()) for k, v in weights(os.path.join(again, "model")).items())
    else:
        out["max_weight_diff_two_uninterrupted_runs"] = "skipped: the time budget is spent"
    return out


def train_worker(argv):
    """`gpu_check.py --train_worker [--pause_marker=PATH] -- TRAIN ARGS`, under torchrun: train.py's
    cli with its one rank on the multi-rank path (FSDP), and, with --pause_marker, a pause right
    after the first checkpoint is written, the marker naming this pid, for the parent to kill."""
    import train
    split = argv.index("--")
    own, args = argv[:split], argv[split + 1:]
    marker = next((a.split("=", 1)[1] for a in own if a.startswith("--pause_marker=")), None)
    dist.Dist.ddp = property(lambda self: True)  # one rank: selfrm's FSDP path (it shards when world.ddp)
    if marker:
        real_save = trainer.save_checkpoint

        def save_then_pause(path, raw_model, optimizer, scaler, step, world, window):
            real_save(path, raw_model, optimizer, scaler, step, world, window)
            with open(marker + ".tmp", "w") as f:
                json.dump({"pid": os.getpid(), "step": step}, f)
            os.replace(marker + ".tmp", marker)
            time.sleep(3600)  # the parent's SIGKILL ends this
        trainer.save_checkpoint = save_then_pause
    sys.argv = ["train.py", *args]
    cli(train.main, train.settings_from_argv)


# ----------------------------------------------------------------------------- the report

# run in this order: FSDP first (never run on a GPU before), so that a slow section leaves them done;
# the .md lists them in the order
SECTIONS = {"versions": check_versions, "fsdp_memory": check_fsdp_memory, "fsdp_scoring": check_fsdp_scoring,
            "fsdp_resume": check_fsdp_resume, "sdpa": check_sdpa, "shared": check_shared, "head": check_head,
            "fp16": check_fp16}


def run_section(ctx, name):
    """One section: skipped when its estimate would pass the budget, else its numbers or its error."""
    estimate = ESTIMATES[name][1 if ctx.quick else 0]
    elapsed = time.time() - START
    if elapsed + estimate > ctx.cfg.budget_s:
        return {"status": f"skipped: the time budget: {elapsed:.0f} s elapsed + about {estimate} s for this section "
                          f"would pass --budget_s={ctx.cfg.budget_s:.0f}"}
    start = time.time()
    try:
        result = {"status": "ok", **SECTIONS[name](ctx)}
    except Exception as e:  # recorded, and the next section runs
        result = {"status": f"error: {type(e).__name__}: {str(e)[:500]}", "traceback": traceback.format_exc()[-4000:]}
    result["seconds"] = time.time() - start
    free_memory()
    return result


def main(cfg):
    ctx = Context(cfg)
    device = torch.cuda.get_device_name(0) if CUDA else "cpu"
    slug = device.lower().replace("nvidia", "").strip().split()[0] if CUDA else "cpu"
    results_dir = cfg.results_dir or (os.path.join(ROOT, "bench", "results") if CUDA else "/tmp/selfrm-gpu-check")
    if not CUDA and os.path.realpath(results_dir) == os.path.realpath(os.path.join(ROOT, "bench", "results")):
        raise SettingsError("no CUDA: a CPU run is a smoke test, not GPU figures; give a --results_dir outside bench/results")
    name = cfg.name or f"gpu_check_{slug}_{time.strftime('%Y-%m-%d')}"
    os.makedirs(results_dir, exist_ok=True)
    wanted = [s for s in cfg.sections.split(",") if s] or list(SECTIONS)
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        raise SettingsError(f"--sections: unknown {sorted(unknown)}; the sections: {', '.join(SECTIONS)}")
    report = {"script": "bench/gpu_check.py", "device": device, "quick": ctx.quick, "date": time.strftime("%Y-%m-%d %H:%M"),
              "budget_s": cfg.budget_s, "work_dir": ctx.work, "sections": {}}
    paths = [os.path.join(results_dir, f"{name}.{ext}") for ext in ("json", "md")]
    try:
        for i, section in enumerate(wanted):
            ctx.later_s = sum(ESTIMATES[later][1 if ctx.quick else 0] for later in wanted[i + 1:])
            result = run_section(ctx, section)
            report["sections"][section] = result
            report["total_seconds"] = time.time() - START
            took = f" ({result['seconds']:.1f} s)" if "seconds" in result else ""
            print(f"[{time.time() - START:6.1f} s] {section}: {result['status'][:300]}{took}", flush=True)
            write(report, paths)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if not cfg.work_dir:  # a temporary folder (in /dev/shm, host memory, on a big machine)
            import shutil
            shutil.rmtree(ctx.work, ignore_errors=True)
    print(markdown(report))
    print(f"wrote {paths[0]} and {paths[1]} ({report['total_seconds']:.0f} s in all)")


def write(report, paths):
    """The .json, then the .md (a summary that fails to render says so; the numbers stay)."""
    with open(paths[0] + ".tmp", "w") as f:
        json.dump(report, f, indent=2, default=str)
    os.replace(paths[0] + ".tmp", paths[0])
    with open(paths[1], "w") as f:
        f.write(markdown(report))


# ----------------------------------------------------------------------------- the .md summary

def mb(v):
    return f"{v:,.0f} MB" if isinstance(v, (int, float)) else str(v)


def num(v, fmt=".2e"):
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def md_versions(r):
    return [f"- torch {r['torch']} (CUDA {r['torch_cuda']}, cuDNN {r['cudnn']}, NCCL {r.get('nccl')}), "
            f"transformers {r['transformers']}, peft {r['peft']}, Python {r['python']}",
            f"- device: {r['device']}" + (f", capability {r['capability']}, {r['memory_gb']:.0f} GB" if "capability" in r else ""),
            f"- is_bf16_supported(): {r['is_bf16_supported']}; without emulation: "
            f"{r['is_bf16_supported_without_emulation']}; --dtype=auto autocasts to {r['dtype_auto_resolves_to']}",
            f"- sdpa back-ends enabled: {r.get('sdpa_enabled', NEEDS_CUDA)}"]


def md_sdpa(r):
    lines = ["| model | attention | tokens a sequence | shared row | kernel, shared | kernel, unshared | "
             "peak above weights, shared | unshared | max prob diff | NaN |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arch, v in r.items():
        if isinstance(v, str) and arch != "status":
            lines.append(f"| {arch} | {v[:160]} |")
        if not isinstance(v, dict):
            continue
        lines.append(f"| {arch} | {v['attention']} | {v['sequence_tokens']} | {v['shared_row_tokens']} | "
                     f"{', '.join(v['shared']['sdpa_backend'])} | {', '.join(v['unshared']['sdpa_backend'])} | "
                     f"{mb(v['shared']['above_weights_mb'])} | {mb(v['unshared']['above_weights_mb'])} | "
                     f"{num(v['max_diff']['prob_a'])} | {v['nan_shared']} / {v['nan_unshared']} |")
    return lines + ["", "One batch of pairs as score_encoded takes it (both orders of a pm pair: 2 sequences "
                    "unshared, 1 row shared); bf16 weights with bf16 autocast, as selfrm scores under --dtype=bf16 "
                    "(scoring_model loads bf16 weights; the label rows are fp32). The aten "
                    "attention ops counted and the warnings sdpa raised are in the .json."]


def md_shared(r):
    heads = {"fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast", "bf16_weights": "bf16 weights"}
    lines = ["| model | attention | " + " | ".join(f"{heads[d]}: max diff (vs fp32), NaN" for d in SHARED_CASES) + " |",
             "|---|---|" + "---|" * len(SHARED_CASES)]
    for key, v in r.items():
        if not isinstance(v, dict) or "attention" not in v:
            continue
        cells = [x if isinstance(x, str) else f"{num(x['max_diff']['prob_a'])} ({num(x['max_diff_vs_fp32_unshared'])}), "
                 f"{x['nan_shared']}/{x['nan_unshared']}" for x in (v[d] for d in SHARED_CASES)]
        lines.append(f"| {key} | {v['attention']} | " + " | ".join(cells) + " |")
    return lines + ["", f"prob_a, shared against unshared (in brackets: against fp32 unshared), {r['pairs']['n']} pairs "
                    f"of {r['pairs']['tokens']} tokens, window 8 where the architecture has one; NaN: shared/unshared. "
                    "Autocast columns: fp32 weights (training's; scoring's under fp32 and fp16); bf16 weights: "
                    "bf16 autocast on bf16 weights, as scoring_model loads them under --dtype=bf16."]


def md_head(r):
    lines = []
    for kind in ("pm", "rm"):
        v = r[kind]
        lines.append(f"- {kind} ({v['head']}), training micro-batch {v['train_micro_batch']['input_ids']}"
                     f"{' (shared-prefix rows)' if v['train_share_prefix'] else ''}:")
        lines += [f"  - {k}: {n} call(s)" for k, n in v["calls"].items()] or ["  - the head was not called"]
    return lines


def md_fp16(r):
    lines = ["| dtype | loss first -> last | finite | skipped steps | scale (last) | grad norm (first, last) |",
             "|---|---|---|---|---|---|"]
    for d in ("fp32", "bf16", "fp16"):
        v = r[d]
        if isinstance(v, str):
            lines.append(f"| {d} | {v} |")
            continue
        first, last = v["steps"][0], v["steps"][-1]
        lines.append(f"| {d} | {v['loss_first']:.4f} -> {v['loss_last']:.4f} | {v['all_finite']} | {v['skipped_steps']} | "
                     f"{last['scale']} | {num(first['grad_norm_before_clip'], '.3g')}, {num(last['grad_norm_before_clip'], '.3g')} |")
    return lines


def md_fsdp_memory(r):
    one, four = r["1_micro_steps"], r["4_micro_steps"]
    size = f"{one['params'] / 1e9:.2f}B" if one["params"] > 1e8 else f"{one['params'] / 1e6:.2f}M"
    row = lambda k, v: (f"| {k} | {mb(v['peak_mb'])} | {v['steps'][0]['loss']:.4f} | "
                        f"{[round(x) if x else x for x in v['steps'][-1]['allocated_at_each_micro_step_mb']]} |")
    return [f"{size}-parameter Llama pm, {r['sequence_tokens']} tokens a sequence, micro-batch 1, bf16 (fp32 master "
            "weights, reduce fp32), gradient checkpointing; two optimizer steps each (the second holds AdamW's state).", "",
            "| micro-steps | peak (both steps) | loss step 1 | MB allocated at each micro-step's start, step 2 |",
            "|---|---|---|---|", row(1, one), row(4, four), "",
            f"Growth with 4 micro-steps: {mb(r.get('peak_growth_mb', NEEDS_CUDA))}; the whole fp32 gradient is "
            f"{mb(r.get('fp32_gradient_mb', NEEDS_CUDA))} (on one rank a shard is the whole tensor)."]


def md_fsdp_scoring(r):
    lines = ["| run | weights as loaded | peak | seconds | max prob diff vs unsharded bf16 | vs unsharded fp32 | NaN |",
             "|---|---|---|---|---|---|---|"]
    for k in ("fsdp_bf16", "unsharded_bf16", "unsharded_fp32"):
        v = r[k]
        lines.append(f"| {k} | {v['weights_dtype']} | {mb(v['peak_mb'])} | {v['seconds']:.1f} | "
                     f"{num(v['max_prob_diff_vs_unsharded_bf16'])} | {num(v['max_prob_diff_vs_unsharded_fp32'])} | {v['nan']} |")
    return lines + ["", f"{r['pairs']} pm pairs (both orders), {r['tokens_per_sequence']} tokens a sequence, scoring.score "
                    "with scoring_model's model (--share_prefix=auto). FSDP2 on a group of one: "
                    f"{r['one_rank_inference_mode']} (the sharded run makes its first forward under no_grad)."]


def md_fsdp_resume(r):
    killed, resumed = r["killed"], r["resumed"]
    return [f"- {r['steps']} optimizer steps of 4 pairs (micro-batch 1), checkpoint at step {r['checkpoint_at']}; SIGKILL "
            f"to the worker once state.pt existed ({killed['state_pt_existed']}; the checkpoint folder held "
            f"{killed['checkpoint_files']}); torchrun returned {killed['torchrun_returncode']}; a model saved: "
            f"{killed['model_saved']}",
            f"- the same command again: returncode {resumed['returncode']}, `{resumed['resume_line']}`",
            f"- **max weight difference, resumed vs uninterrupted: {num(r['max_weight_diff'])}** (two uninterrupted "
            f"runs: {num(r['max_weight_diff_two_uninterrupted_runs'])})",
            f"- losses uninterrupted {[round(x, 4) for x in r['losses_reference']]}, resumed "
            f"{[round(x, 4) for x in r['losses_resumed']]}"]


SUMMARIES = [("versions", "Versions", md_versions),
             ("sdpa", "The sdpa kernel of the shared-prefix mask, and its memory (pm scoring, one batch)", md_sdpa),
             ("shared", "Shared vs unshared scores on the device", md_shared),
             ("head", "The head's input in training and scoring (pm: selfrm.modeling._Rows's; rm: a hook on the score head)",
              md_head),
             ("fp16", "fp16 with GradScaler and clipping, against fp32 and bf16 (the same steps on one batch)", md_fp16),
             ("fsdp_memory", "FSDP2, one-rank group: peak memory with 1 and 4 micro-steps per optimizer step",
              md_fsdp_memory),
             ("fsdp_scoring", "Scoring under FSDP against the unsharded model", md_fsdp_scoring),
             ("fsdp_resume", "Kill after a checkpoint and resume (train.py under torchrun, one rank, FSDP)", md_fsdp_resume)]


def markdown(report):
    """The summary, in the issue's order: one short block per section; every number is in the .json."""
    lines = [f"# bench/gpu_check.py on {report['device']}" + (" (quick: a smoke test, not GPU figures)" if report["quick"] else ""),
             "", f"{report['date']}, {report.get('total_seconds', 0):.0f} s in all (budget {report['budget_s']:.0f} s). "
             "Models built from configs with random weights: figures of the code paths, not of accuracy.", ""]
    for name, title, render in SUMMARIES:
        r = report["sections"].get(name)
        if r is None:
            continue
        lines += [f"## {title}", ""]
        if r["status"] != "ok":
            lines += [r["status"][:400], ""]
            continue
        try:
            lines += render(r) + [""]
        except Exception as e:  # a summary that does not fit the numbers: they are in the .json all the same
            lines += [f"(this summary failed: {type(e).__name__}: {e}; the numbers are in the .json)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--train_worker":
        train_worker(sys.argv[2:])
    else:
        cli(main, lambda: parse_args(CheckSettings))
