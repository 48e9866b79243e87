"""Models: load and save (Hugging Face format, safetensors), LoRA through peft, and the two
reward-model kinds as small `nn.Module`s that DDP wraps.

- `PreferenceModel` (pm): a causal LM; only the hidden state at the label position goes
  through the LM head (and the LM's own logit scaling), so no (B, T, V) logits tensor is
  ever built.
- `RewardModel` (rm): a sequence classifier with one output; the reward is its logit.
"""
import contextlib
import copy
import functools
import importlib.util
import json
import logging
import os
import warnings

import torch
import torch.nn as nn
from peft import LoraConfig, PeftConfig, PeftModel, TaskType, get_peft_model
from peft.utils import ModulesToSaveWrapper
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.modeling_outputs import BaseModelOutputWithPast

from selfrm import toy
from selfrm.dist import print0
from selfrm.files import atomic_dir, read_json
from selfrm.settings import SettingsError
from selfrm.sharing import compute_dtype, decoder_masks, split_attention_on


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

    def forward(self, input_ids, attention_mask, label_positions, token_ids=None, segment_ids=None, position_ids=None):
        """Next-token logits at label_positions, fp32: (B, V), or (B, len(token_ids)) when only
        the columns of `token_ids` (e.g. the ids of `A` and `B`) are wanted. In the shared-prefix
        layout (selfrm/sharing.py: segment_ids and position_ids given, attention_mask unused)
        label_positions is (B, 2) and the logits (2B, ...) are row 0's two sequences, then row 1's.

        The backbone runs on the whole sequence; the LM's own forward then runs on the label
        positions' hidden states only, so its head and whatever the architecture does to its
        logits (Gemma's soft-capping, Cohere's logit_scale, Granite's logits_scaling, ...)
        apply exactly as in a full forward, without the (B, T, V) logits of one.

        That forward runs outside autocast. With `token_ids` it runs in fp32 on the head's rows of
        them only (_Rows): a bf16 head output would move logits between 16 and 32 in steps of 0.125,
        so P(A) near 0.5 in steps of about 3%; two rows cost nothing. Training's full vocabulary
        runs in the head's own dtype (fp32 for fp32 weights; bf16 where the head is held in bf16,
        as under FSDP's bf16 gathering, whose fp32 copy would cost V x H x 4 bytes), then fp32."""
        hf = self.hf
        backbone, head = getattr(hf, hf.base_model_prefix), hf.get_output_embeddings()
        hidden = backbone_states(hf, input_ids, attention_mask, segment_ids, position_ids)
        rows = torch.arange(hidden.size(0), device=hidden.device)
        if label_positions.dim() == 2:  # two sequences per row
            rows = rows.repeat_interleave(2)
        label_hidden = hidden[rows, label_positions.reshape(-1)]
        rows_only = isinstance(head, nn.Linear)  # else (LoRA on the head) its own forward and dtype, as before
        try:
            setattr(hf, hf.base_model_prefix, _Given(backbone, (label_hidden.float() if rows_only else label_hidden)[:, None]))
            if rows_only:
                hf.set_output_embeddings(_Rows(head, token_ids))
            with torch.autocast(hidden.device.type, enabled=False) if rows_only else contextlib.nullcontext():
                logits = hf(input_ids=input_ids[rows, :1], use_cache=False).logits[:, -1]
        finally:
            setattr(hf, hf.base_model_prefix, backbone)
            hf.set_output_embeddings(head)
        if token_ids is not None and not rows_only:
            logits = logits[:, token_ids]
        return logits.to(torch.float32, copy=True)  # not a view: FSDP2 hooks this output for its backward


def backbone_states(hf, input_ids, attention_mask, segment_ids=None, position_ids=None):
    """The backbone's last hidden states (B, T, H): with the padding mask, or in the shared-prefix
    layout with its per-pair mask (built on the device, in the compute dtype) and restarting
    position ids."""
    backbone = getattr(hf, hf.base_model_prefix)
    if segment_ids is not None:
        split_attention_on(hf.config)
        attention_mask = decoder_masks(hf.config, segment_ids, position_ids,
                                       compute_dtype(backbone, input_ids.device.type))
    return backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False).last_hidden_state


class _StandIn(nn.Module):
    """Stands in for one of a causal LM's modules for one call. Attributes the LM reads off that
    module (Falcon-H1's lm_head_multiplier on the backbone, Mamba's lm_head.weight.dtype) come
    from the real one."""

    def __init__(self, real):
        super().__init__()
        object.__setattr__(self, "real", real)  # not a submodule: its weights stay where they are

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "real"), name)


class _Given(_StandIn):
    """The backbone: returns the hidden states it was given."""

    def __init__(self, backbone, hidden):
        super().__init__(backbone)
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        return BaseModelOutputWithPast(last_hidden_state=self.hidden)


class _Rows(_StandIn):
    """The head: the fp32 product of the hidden states and the head's rows of `token_ids` (all
    of them, in the head's dtype, when None)."""

    def __init__(self, head, token_ids):
        super().__init__(head)
        self.token_ids = token_ids

    def forward(self, hidden):
        weight, bias = self.real.weight, self.real.bias
        if self.token_ids is None:  # training's full vocabulary, in the head's dtype: an fp32 copy of a bf16
            # head (FSDP's bf16 gathering) would be kept for the backward, V x H x 4 bytes (2.1 GB for Llama-3-8B)
            return nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()
        weight, bias = weight[self.token_ids], None if bias is None else bias[self.token_ids]
        return nn.functional.linear(hidden.float(), weight.float(), None if bias is None else bias.float())


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

    def forward(self, input_ids, attention_mask=None, segment_ids=None, position_ids=None, read_positions=None):
        """(N,) fp32 rewards. In the shared-prefix layout (selfrm/sharing.py: segment_ids,
        position_ids and read_positions (B, 2) given) (B, 2): each row's two sequences' rewards,
        the classifier's own head applied to the hidden states at read_positions."""
        if segment_ids is None:
            rewards = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        else:
            hf = self.hf
            hidden = backbone_states(hf, input_ids, None, segment_ids, position_ids)
            rows = torch.arange(hidden.size(0), device=hidden.device)[:, None]
            rewards = hf.score(hidden[rows, read_positions])[..., 0]
        return rewards.to(torch.float32, copy=True)  # not a view: FSDP2 hooks this output for its backward


def inner(model):
    """The PreferenceModel/RewardModel inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


# ----------------------------------------------------------------------------- loading

def check_source(source, gguf_file=None):
    """A model given as a local path must exist: without this check transformers takes a
    missing folder for a hub id and fails on the network. A folder of GGUF weights needs
    --gguf_file to name one (transformers would otherwise fail on a missing tokenizer
    library), and reading one needs the gguf package. Returns the GGUF file to load: None
    for a folder that holds none, such as round_0/model of a run started from GGUF weights."""
    local = os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1 or os.sep + os.sep in source
    folder = os.path.expanduser(source)
    if local and not os.path.isdir(folder):
        raise SettingsError(f"--model={source}: no such model folder")
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf")) if os.path.isdir(folder) else None
    if ggufs and not gguf_file and not os.path.exists(os.path.join(folder, "config.json")):
        raise SettingsError(f"--model={source} holds GGUF weights ({', '.join(ggufs)}) and no config.json: "
                            f"name the file to load with --gguf_file={ggufs[0]}")
    if not gguf_file or ggufs == []:  # no GGUF asked for, or a folder of plain weights (a model selfrm saved)
        return None
    if ggufs is not None and gguf_file not in ggufs:
        raise SettingsError(f"--gguf_file={gguf_file}: not in {source}, which holds {', '.join(ggufs)}")
    if importlib.util.find_spec("gguf") is None:
        raise SettingsError(f"--gguf_file={gguf_file}: reading GGUF weights needs the gguf package: pip install gguf")
    return gguf_file


def from_pretrained(auto, source, **kwargs):
    """auto.from_pretrained, with a failure to find or read the model as one clear error. For a
    model, transformers' load report (a table with terminal colour codes) becomes one plain
    line: what report_new_weights says."""
    kwargs["gguf_file"] = check_source(source, kwargs.get("gguf_file"))
    is_model = auto is not AutoTokenizer
    try:
        with _without_load_report():
            loaded = auto.from_pretrained(source, **kwargs, **({"output_loading_info": True} if is_model else {}))
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SettingsError(f"--model={source}: cannot be loaded ({first})") from None
    if not is_model:
        return loaded
    model, info = loaded
    report_new_weights(model, source, info)
    return model


def load_tokenizer(cfg, source=None):
    source = source or cfg.model
    if source == "toy":
        tokenizer = toy.build_tokenizer()
    elif cfg.gguf_file:  # a copy: the caller may change it
        tokenizer = copy.deepcopy(_gguf_tokenizer(source, cfg.gguf_file, cfg.trust_remote_code))
    else:
        tokenizer = from_pretrained(AutoTokenizer, source, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:  # prefer a token that never ends a real text
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise ValueError(f"{source}: the tokenizer has no pad, unk or eos token to pad with")
    # selfrm cuts every sequence to --max_length itself (Encoder.fit): the tokenizer's warning
    # that a whole text is longer than the model's maximum would read as an error and is not one
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    quiet_deprecations()
    return tokenizer


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(source, gguf_file, trust_remote_code):
    """Reading a tokenizer out of a GGUF file takes seconds (its whole vocabulary is parsed), and
    a run needs it for the template check and every round: read once per process."""
    return from_pretrained(AutoTokenizer, source, gguf_file=gguf_file, trust_remote_code=trust_remote_code)


def report_new_weights(model, source, info):
    """One plain line for weights the checkpoint lacks (a reward model's new score head, which
    training learns) or holds unused, in place of transformers' load report."""
    name = type(model).__name__
    if info["missing_keys"]:
        print0(f"{name}: {', '.join(sorted(info['missing_keys']))} not in {source}: initialised at random "
               f"(expected for a new score head, which training learns)")
    if info["unexpected_keys"]:
        print0(f"{name}: {', '.join(sorted(info['unexpected_keys']))} in {source} not used by this architecture")


def quiet_deprecations():
    """Hide deprecation warnings raised inside the calls selfrm makes, which a user can do
    nothing about: peft's get_peft_model reads transformers 5's deprecated
    `is_gradient_checkpointing`; the trainer's `gradient_checkpointing_enable` is renamed
    `activation_checkpointing_enable` in recent releases. Every script loads a tokenizer before
    any model."""
    for name in ("is_gradient_checkpointing", "gradient_checkpointing_enable"):
        warnings.filterwarnings("ignore", message=f".*{name}.* is deprecated", category=FutureWarning)


@contextlib.contextmanager
def _without_load_report():
    """Drop the load report transformers logs as a warning: selfrm says it in one line."""
    logger = logging.getLogger("transformers.modeling_utils")
    drop = lambda record: "LOAD REPORT" not in record.getMessage()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


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


def resolve_max_length(cfg):
    """label.py/evaluate.py: --max_length=0 means the length the model was trained at (from
    the settings.json saved with it), else 512. Says which."""
    if cfg.max_length:
        return cfg.max_length
    path = os.path.join(cfg.model, "settings.json")
    trained = read_json(path).get("max_length") if os.path.isfile(path) else None
    cfg.max_length = trained or 512
    where = f"the length {cfg.model} was trained at" if trained else f"the default: {cfg.model} records no training length"
    print0(f"--max_length={cfg.max_length} ({where}; pass --max_length to change it)")
    return cfg.max_length


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


def load_model(cfg, source=None, tokenizer=None, meta=False, dtype=torch.float32, device=None):
    """The model of kind cfg.model_type from `source` (default cfg.model), as a PreferenceModel
    or RewardModel: fp32 weights on the CPU whatever dtype the checkpoint's config names (the
    master weights training needs), or, for scoring, in `dtype` on `device`: each tensor is
    converted as it is read and put on the device, so no fp32 copy of the model is built first
    (the toy, built from its config, is cast after). A folder holding a LoRA adapter saved by
    selfrm is loaded on top of its base model.
    meta=True builds the same modules (adapters included) on the meta device, with no weights:
    an FSDP rank that receives its shards from rank 0. Its dtype must be rank 0's: a
    `"dtype": "bfloat16"` config would otherwise give it bf16 master weights."""
    source = source or cfg.model
    tokenizer = tokenizer or load_tokenizer(cfg, source)
    auto = AutoModelForCausalLM if cfg.model_type == "pm" else AutoModelForSequenceClassification
    extra = {"num_labels": 1} if cfg.model_type == "rm" else {}
    adapter = adapter_config(source)
    base = adapter["base_model_name_or_path"] if adapter else source
    if source == "toy":
        torch.manual_seed(cfg.seed)
        with torch.device("meta") if meta else contextlib.nullcontext():
            hf = toy.build_model(cfg.model_type, tokenizer).to(dtype)
    elif meta:
        gguf_file = check_source(base, cfg.gguf_file or None)  # None for a saved folder, as rank 0 reads it
        config = AutoConfig.from_pretrained(base, gguf_file=gguf_file,
                                            trust_remote_code=cfg.trust_remote_code, **extra)
        with torch.device("meta"):
            hf = auto.from_config(config, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    else:
        gguf_file = check_source(base, cfg.gguf_file or None)  # dequantized on the CPU: rebuilt plain, moved after
        hf = from_pretrained(auto, base, gguf_file=gguf_file, dtype=dtype, device_map=None if gguf_file else device,
                             trust_remote_code=cfg.trust_remote_code, **extra)
        if gguf_file:
            hf = plain_copy(hf)
    hf.config.pad_token_id = tokenizer.pad_token_id
    hf.config.use_cache = False  # training and scoring never decode
    if adapter and meta:  # the adapter's modules, empty: rank 0 sends their weights
        config = PeftConfig.from_pretrained(source)
        config.inference_mode = False  # trainable, as is_trainable=True makes them below
        hf = get_peft_model(hf, config)
    elif adapter:
        hf = PeftModel.from_pretrained(hf, source, is_trainable=True)
    model = (PreferenceModel if cfg.model_type == "pm" else RewardModel)(hf)
    return (model.to(device) if device else model), tokenizer  # the toy, GGUF and adapters: moved after


def adapter_config(source):
    """The adapter_config.json of a LoRA adapter folder (a dict), or None."""
    path = os.path.join(source, "adapter_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def plain_copy(hf):
    """A GGUF-loaded model stays marked as quantized and cannot be saved: rebuild a plain
    model of the same class and dtype and copy the dequantized weights into it."""
    config = hf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(hf)._from_config(config, dtype=hf.dtype)
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


def save_model(model, tokenizer, path, settings, adapter_only=False, summary=None):
    """Write `path` whole or not at all: the HF model (LoRA merged unless adapter_only), the
    tokenizer, settings.json and the training summary (summary.json: a rerun that finds the
    model reports the same loss and cut counts). Merging replaces the adapters inside `model` by the merged
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
        if summary is not None:
            with open(os.path.join(tmp, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
