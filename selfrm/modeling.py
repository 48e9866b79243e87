"""Models: load and save (Hugging Face format, safetensors), LoRA through peft, and the two
reward-model kinds as small `nn.Module`s that DDP wraps.

- `PreferenceModel` (pm): a causal LM; only the hidden state at the label position goes
  through the LM head (and the LM's own logit scaling), so no (B, T, V) logits tensor is
  ever built.
- `RewardModel` (rm): a sequence classifier with one output; the reward is its logit.
"""
import copy
import json
import os

import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils import ModulesToSaveWrapper
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.modeling_outputs import BaseModelOutputWithPast

from selfrm import toy
from selfrm.files import atomic_dir
from selfrm.settings import SettingsError


class PreferenceModel(nn.Module):
    """Pairwise preference LM (SPEC 1a). `lm` is an HF causal LM, or a peft model around one."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    @property
    def hf(self):
        """The HF causal LM (LoRA layers, if any, live inside it)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    @property
    def adapted(self):
        """The module the wrapper calls: the peft model under LoRA, else the HF model."""
        return self.lm

    def forward(self, input_ids, attention_mask, label_positions, token_ids=None):
        """Next-token logits at label_positions, fp32: (B, V), or (B, len(token_ids)) when only
        the columns of `token_ids` (e.g. the ids of `A` and `B`) are wanted.

        The backbone runs on the whole sequence; the LM's own forward then runs on the label
        positions' hidden states only, so its head and whatever the architecture does to its
        logits (Gemma's soft-capping, Cohere's logit_scale, Granite's logits_scaling, ...)
        apply exactly as in a full forward, without the (B, T, V) logits of one."""
        hf = self.hf
        backbone = getattr(hf, hf.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        label_hidden = hidden[torch.arange(hidden.size(0), device=hidden.device), label_positions]
        setattr(hf, hf.base_model_prefix, _Given(backbone, label_hidden[:, None]))
        try:
            logits = hf(input_ids=input_ids[:, :1], use_cache=False).logits[:, -1]
        finally:
            setattr(hf, hf.base_model_prefix, backbone)
        if token_ids is not None:
            logits = logits[:, token_ids]
        return logits.to(torch.float32, copy=True)  # not a view: FSDP2 hooks this output for its backward


class _Given(nn.Module):
    """Stands in for a causal LM's backbone for one call: returns the hidden states it was
    given. Attributes the LM reads off its backbone (Falcon-H1's lm_head_multiplier) come
    from the real one."""

    def __init__(self, backbone, hidden):
        super().__init__()
        object.__setattr__(self, "backbone", backbone)  # not a submodule: its weights stay where they are
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        return BaseModelOutputWithPast(last_hidden_state=self.hidden)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "backbone"), name)


class RewardModel(nn.Module):
    """Scalar reward model (SPEC 1b). `model` is an HF sequence classifier with num_labels=1
    (or a peft model around one); right padding does not move the reward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def hf(self):
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def adapted(self):
        return self.model

    def forward(self, input_ids, attention_mask):
        """(N,) fp32 rewards."""
        rewards = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        return rewards.to(torch.float32, copy=True)  # not a view: FSDP2 hooks this output for its backward


def inner(model):
    """The PreferenceModel/RewardModel inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


# ----------------------------------------------------------------------------- loading

def check_source(source):
    """A model given as a local path must exist: without this check transformers takes a
    missing folder for a hub id and fails on the network."""
    local = os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1 or os.sep + os.sep in source
    if local and not os.path.isdir(os.path.expanduser(source)):
        raise SettingsError(f"--model={source}: no such model folder")


def from_pretrained(auto, source, **kwargs):
    """auto.from_pretrained, with a failure to find or read the model as one clear error."""
    check_source(source)
    try:
        return auto.from_pretrained(source, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SettingsError(f"--model={source}: cannot be loaded ({first})") from None


def load_tokenizer(cfg, source=None):
    source = source or cfg.model
    if source == "toy":
        tokenizer = toy.build_tokenizer()
    else:
        tokenizer = from_pretrained(AutoTokenizer, source, gguf_file=cfg.gguf_file or None,
                                    trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:  # prefer a token that never ends a real text
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise ValueError(f"{source}: the tokenizer has no pad, unk or eos token to pad with")
    return tokenizer


def model_type_of(source):
    """'pm' or 'rm' for a saved model folder: from selfrm's settings.json, else from the
    architecture name in config.json; None when neither says."""
    settings = os.path.join(source, "settings.json")
    if os.path.exists(settings):
        with open(settings) as f:
            return json.load(f).get("model_type")
    if os.path.exists(os.path.join(source, "config.json")):
        archs = AutoConfig.from_pretrained(source).architectures or []
        if any(a.endswith("ForCausalLM") for a in archs):
            return "pm"
        if any(a.endswith("ForSequenceClassification") for a in archs):
            return "rm"
    return None


def resolve_model_type(cfg):
    """label.py/evaluate.py: the model kind from --model_type or the model's own settings;
    a --model_type that contradicts what the model was trained as is an error (scoring a
    causal LM as a sequence classifier would read a random head)."""
    saved = model_type_of(cfg.model) if os.path.isdir(cfg.model) else None
    if cfg.model_type == "auto":
        return saved or "pm"
    if saved and saved != cfg.model_type:
        raise SettingsError(f"--model_type={cfg.model_type} contradicts {cfg.model}, which was trained as "
                            f"--model_type={saved}: leave --model_type=auto")
    return cfg.model_type


def check_outputs(outputs, inputs):
    """Output files (setting -> path; empty = none) may not be folders, nor overwrite an input."""
    sources = {os.path.realpath(p) for p in inputs if p}
    for key, path in outputs.items():
        if not path:
            continue
        if os.path.isdir(path):
            raise SettingsError(f"--{key}={path}: is a folder; name a file")
        if os.path.realpath(path) in sources:
            raise SettingsError(f"--{key}={path}: is an input file of this run; it would be overwritten")


def load_model(cfg, source=None, tokenizer=None, meta=False):
    """The model of kind cfg.model_type from `source` (default cfg.model), fp32 weights on the
    CPU, as a PreferenceModel or RewardModel. A folder holding a LoRA adapter saved by
    selfrm is loaded on top of its base model. meta=True builds the architecture on the
    meta device, with no weights (an FSDP rank that receives its shards from rank 0)."""
    source = source or cfg.model
    tokenizer = tokenizer or load_tokenizer(cfg, source)
    auto = AutoModelForCausalLM if cfg.model_type == "pm" else AutoModelForSequenceClassification
    extra = {"num_labels": 1} if cfg.model_type == "rm" else {}
    adapter = os.path.isdir(source) and os.path.exists(os.path.join(source, "adapter_config.json"))
    if meta:
        with torch.device("meta"):
            if source == "toy":
                hf = toy.build_model(cfg.model_type, tokenizer)
            else:
                check_source(source)
                config = AutoConfig.from_pretrained(source, gguf_file=cfg.gguf_file or None,
                                                    trust_remote_code=cfg.trust_remote_code, **extra)
                hf = auto.from_config(config, trust_remote_code=cfg.trust_remote_code)
    elif source == "toy":
        torch.manual_seed(cfg.seed)
        hf = toy.build_model(cfg.model_type, tokenizer)
    else:
        base = source
        if adapter:
            with open(os.path.join(source, "adapter_config.json")) as f:
                base = json.load(f)["base_model_name_or_path"]
        hf = from_pretrained(auto, base, gguf_file=cfg.gguf_file or None, dtype=torch.float32,
                             trust_remote_code=cfg.trust_remote_code, **extra)
        if cfg.gguf_file:
            hf = plain_copy(hf)
    hf.config.pad_token_id = tokenizer.pad_token_id
    hf.config.use_cache = False  # training and scoring never decode
    if adapter:
        hf = PeftModel.from_pretrained(hf, source, is_trainable=True)
    return (PreferenceModel if cfg.model_type == "pm" else RewardModel)(hf), tokenizer


def plain_copy(hf):
    """A GGUF-loaded model stays marked as quantized and cannot be saved: rebuild a plain
    model of the same class and copy the dequantized fp32 weights into it."""
    config = hf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(hf)(config)
    plain.load_state_dict(hf.state_dict())
    return plain


def add_lora(model, cfg):
    """Wrap the HF model inside `model` with LoRA adapters. For rm, peft's SEQ_CLS task
    keeps the score head trainable and saves it with the adapter."""
    targets = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()] or None
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM if cfg.model_type == "pm" else TaskType.SEQ_CLS,
                      r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets)
    if isinstance(model, PreferenceModel):
        model.lm = get_peft_model(model.lm, lora)
    else:
        model.model = get_peft_model(model.model, lora)
    return model


def store_frozen(model, dtype):
    """Keep the frozen weights (the base under LoRA) in `dtype`; trainable ones stay fp32. The
    frozen layers then compute in `dtype` (peft casts what enters and leaves its adapters), and
    peft's trainable copy of a head (the rm's score) gets its input cast to its own dtype."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            module.register_forward_pre_hook(_to_own_dtype)
    return model


def _to_own_dtype(module, args):
    dtype = next(p.dtype for p in module.parameters() if p.requires_grad)
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def rebuilt(model, state):
    """A plain copy of `model` (a PreferenceModel or RewardModel, LoRA adapters included) on the
    CPU, holding the tensors of `state` without copying them: built on the meta device, then
    handed the tensors. For the save, where the model itself is sharded (FSDP) or half
    precision (a LoRA merge into bf16 weights would round the adapters' small update away)."""
    hf, outer = model.hf, model.adapted
    with torch.device("meta"):
        twin = type(hf)(hf.config)
        if hasattr(outer, "peft_config"):  # the same adapters, so the same keys
            twin = get_peft_model(twin, copy.deepcopy(outer.peft_config[outer.active_adapter]))
    twin = type(model)(twin)
    twin.load_state_dict(state, assign=True)  # non-persistent buffers stay on meta: nothing saves them
    twin.hf.tie_weights()  # assign gave tied weights (embeddings and LM head) separate tensors
    return twin


def has_adapters(model):
    """Whether the model already carries LoRA adapters (it was loaded from a saved adapter)."""
    return hasattr(model.adapted, "peft_config")


def save_model(model, tokenizer, path, settings, adapter_only=False):
    """Write `path` whole or not at all: the HF model (LoRA merged unless adapter_only), the
    tokenizer and settings.json. Merging replaces the adapters inside `model` by the merged
    weights, so `model` stays usable (for scoring) after the save."""
    model = inner(model)
    hf = model.adapted
    if hasattr(hf, "merge_and_unload") and not adapter_only:
        hf = hf.merge_and_unload()
        if isinstance(model, PreferenceModel):
            model.lm = hf
        else:
            model.model = hf
    with atomic_dir(path) as tmp:
        hf.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "settings.json"), "w") as f:
            json.dump(settings, f, indent=2)
