"""Loading policies, reward models and tokenizers; LoRA through PEFT; the reference model; saving.

    tok = load_tokenizer("out/tiny-llama")
    policy = load_policy("out/tiny-llama", dtype="bfloat16", lora={"r": 8, "alpha": 16})
    with reference_context(policy) as ref:      # same weights, adapter disabled, no grad
        ref_logps, _, _ = sequence_logps(ref, batch)

Sources are a local folder, a `.gguf` file (weights unpacked to dense tensors, tokenizer and chat
template from the same file) or a Hub id (SPEC §3); `sources.py` locates and checks them. A folder
holding only a PEFT adapter (`adapter_config.json`, as `save_model` writes by default) is loaded onto
its recorded base model. `trust_remote_code` is off unless the caller turns it on. Every failure to
find or read a model raises `ModelLoadError` with one line naming the path, e.g.
`model 'X': not a local folder and not reachable on the Hugging Face Hub: ...`.
"""
from __future__ import annotations

import copy
import json
import pickle
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

from .quiet import new_weights_line, no_transformers_bars, quiet_loading
from .sources import (
    ModelLoadError,
    ModelSource,
    check_model_folder,
    check_tokenizer_folder,
    describe_load_failure,
    locate,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
LORA_KEYS = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": None}
# Attention + MLP projections; anything else falls back to PEFT's "all-linear" (every Linear but the head).
DEFAULT_TARGET_MODULES = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
# Tokenizer classes whose tokenizer.json alone defines the tokenizer; AutoTokenizer would otherwise pick a
# class by model type (e.g. Qwen2Tokenizer rebuilds the pre-tokenizer and adds `<|endoftext|>`).
GENERIC_TOKENIZER_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}
# What reading a bad folder or file raises inside transformers / torch / safetensors / the GGUF parser.
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, IndexError, TypeError, ImportError, struct.error,
               pickle.UnpicklingError, SafetensorError)


def _dtype(dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: unknown value {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(name_or_path, trust_remote_code: bool = False):
    """The tokenizer of a folder, `.gguf` file or Hub id. A missing pad token is set to EOS (Llama-style)."""
    source = locate(name_or_path, trust_remote_code)
    check_tokenizer_folder(source)
    config_file = Path(source.path) / "tokenizer_config.json"
    try:
        declared = json.loads(config_file.read_text()).get("tokenizer_class") \
            if source.is_folder and config_file.is_file() else None
        if declared in GENERIC_TOKENIZER_CLASSES and (Path(source.path) / "tokenizer.json").is_file():
            tokenizer = PreTrainedTokenizerFast.from_pretrained(source.path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code,
                                                      **_gguf_only(source))
    except LOAD_ERRORS as err:
        raise describe_load_failure("tokenizer", source, err) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _gguf_only(source: ModelSource) -> dict:
    return {"gguf_file": source.gguf_file} if source.gguf_file else {}


def lora_config(lora: dict, model_type: str, task_type: str):
    """PEFT `LoraConfig` from distalign's keys: r, alpha, dropout, target_modules (None = per-arch default)."""
    from peft import LoraConfig  # peft costs ~50 MB and ~3 s to import: only runs that use LoRA pay for it
    unknown = sorted(set(lora) - set(LORA_KEYS))
    if unknown:
        raise ValueError(f"lora: unknown key(s) {unknown}; valid: {sorted(LORA_KEYS)}")
    settings = {**LORA_KEYS, **lora}
    targets = settings["target_modules"] or DEFAULT_TARGET_MODULES.get(model_type, "all-linear")
    return LoraConfig(r=int(settings["r"]), lora_alpha=settings["alpha"], lora_dropout=float(settings["dropout"]),
                      target_modules=targets, task_type=task_type)


def _adapter_base(source: str) -> str | None:
    """The base model recorded in a folder that holds only a PEFT adapter, else None."""
    folder = Path(source)
    if not (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
        return None
    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"model '{source}': adapter_config.json has no base_model_name_or_path")
    return base


def _load(auto_class, task_type: str, name_or_path, dtype, lora, trust_remote_code, device,
          gradient_checkpointing: bool = False, **extra):
    source = locate(name_or_path, trust_remote_code)
    base_name = _adapter_base(source.path) if source.is_folder else None
    try:
        weights = locate(base_name, trust_remote_code) if base_name else source
    except ModelLoadError as err:
        raise ModelLoadError(f"adapter '{source.name}': its base {err}") from None
    with quiet_loading():
        model, info = _from_pretrained(auto_class, weights, dtype=_dtype(dtype), trust_remote_code=trust_remote_code,
                                       **extra)
        if base_name is not None:
            # A saved adapter: trainable again when the caller asks for LoRA (its settings come from the folder).
            from peft import PeftModel
            try:
                model = PeftModel.from_pretrained(model, source.path, is_trainable=lora is not None)
            except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
                raise describe_load_failure("adapter", source, err) from None
        elif lora is not None:
            from peft import get_peft_model
            model = get_peft_model(model, lora_config(dict(lora), model.config.model_type, task_type))
    if new_weights_line(weights.name, info):
        print(new_weights_line(weights.name, info))
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model.to(device) if device is not None else model


def _from_pretrained(auto_class, source: ModelSource, **kwargs):
    """`auto_class.from_pretrained` (with its loading info) with every failure as one `ModelLoadError` line; a
    GGUF file is unpacked into plain dense weights and keeps no quantization state, so `save_pretrained`
    writes safetensors."""
    check_model_folder(source)
    try:
        model, info = auto_class.from_pretrained(source.path, **source.load_kwargs(), output_loading_info=True,
                                                 **kwargs)
    except LOAD_ERRORS as err:
        raise describe_load_failure("model", source, err) from None
    if source.gguf_file:
        drop_quantization(model, source.name)
        # Where the weights came from, so an adapter trained on it records the .gguf file as its base.
        model.config._name_or_path = model.name_or_path = source.gguf_path
    return model, info


def drop_quantization(model: torch.nn.Module, name: str) -> None:
    """Remove what a GGUF load may leave behind (the quantizer, `config.quantization_config`); refuse a
    model whose weights are still packed, which could neither train nor be saved as safetensors."""
    packed = [name for name, module in model.named_modules() if type(module).__name__.startswith("Gguf")]
    if packed:
        raise ModelLoadError(f"model '{name}': {len(packed)} modules are still GGUF-packed (e.g. {packed[0]}); "
                             "distalign needs dense weights")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Keep only each decoder layer's input for the backward and recompute the layer there (HF activation
    checkpointing, non-reentrant): activation memory drops from ~all intermediates of every layer to one
    hidden state per layer, for about one more forward of compute per step. Losses and gradients are
    unchanged. The non-reentrant form needs no input that requires grad, so it also trains a LoRA adapter
    on frozen weights; input grads are still switched on for PEFT models (what the reentrant form and
    older transformers need). Layers run as usual in eval mode or under no_grad (sampling, the reference).
    """
    base = unwrap_model(model)
    peft = is_peft_model(base)
    if peft:
        base = base.get_base_model()
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(base).__name__} does not support activation "
                         "checkpointing")
    options = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    if peft and getattr(base, "_require_grads_hook", None) is None:
        base.enable_input_require_grads()


def load_policy(name_or_path, *, dtype="float32", lora: dict | None = None, trust_remote_code: bool = False,
                device=None, gradient_checkpointing: bool = False):
    """An `AutoModelForCausalLM`, optionally wrapped with a fresh LoRA adapter (PEFT) and with activation
    checkpointing on (`enable_gradient_checkpointing`)."""
    return _load(AutoModelForCausalLM, "CAUSAL_LM", name_or_path, dtype, lora, trust_remote_code, device,
                 gradient_checkpointing)


def load_reward_model(name_or_path, *, dtype="float32", lora: dict | None = None,
                      trust_remote_code: bool = False, device=None, pad_token_id: int | None = None,
                      gradient_checkpointing: bool = False):
    """An `AutoModelForSequenceClassification` with one label: the scalar reward R(x, y).

    Starting from a causal-LM checkpoint gives a randomly initialised score head (HF warns). The head
    reads the last non-pad token, so the config needs a pad id: `pad_token_id`, else the checkpoint's,
    else its EOS id. With LoRA, PEFT's SEQ_CLS task also trains the score head in full.
    """
    model = _load(AutoModelForSequenceClassification, "SEQ_CLS", name_or_path, dtype, lora, trust_remote_code,
                  device, gradient_checkpointing, num_labels=1)
    config = model.config
    if pad_token_id is not None or config.pad_token_id is None:
        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
        config.pad_token_id = pad_token_id if pad_token_id is not None else eos
    return model


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP / DataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def is_peft_model(model: torch.nn.Module) -> bool:
    peft = sys.modules.get("peft")  # not imported yet: no PeftModel can exist
    return peft is not None and isinstance(unwrap_model(model), peft.PeftModel)


@contextmanager
def reference_context(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run `model` as the reference pi0 under no_grad.

    For a PEFT policy the reference is the same weights with the adapter disabled (no second copy), in
    eval mode for the duration (a training policy would otherwise draw dropout in the reference's
    forward); any other model is taken to be a frozen reference already and is yielded unchanged.
    """
    with torch.no_grad():
        if is_peft_model(model):
            peft_model = unwrap_model(model)
            with evaluating(peft_model), peft_model.disable_adapter():
                yield model
        else:
            yield model


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` in eval mode inside (no dropout); the caller's train/eval flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class ReferenceModel:
    """The reference pi0 of a policy: its disabled-adapter self (LoRA) or a separately loaded frozen copy."""

    def __init__(self, policy: torch.nn.Module, frozen: torch.nn.Module | None = None):
        self.policy, self.frozen = policy, frozen

    @classmethod
    def for_policy(cls, policy: torch.nn.Module, name_or_path=None, **load_kwargs) -> ReferenceModel:
        """No copy for a LoRA policy without an explicit reference; otherwise load `name_or_path` frozen."""
        if is_peft_model(policy) and name_or_path is None:
            return cls(policy)
        if name_or_path is None:
            raise ValueError("reference: a full-weight policy needs the reference's name_or_path")
        frozen = load_policy(name_or_path, **load_kwargs).eval().requires_grad_(False)
        return cls(policy, frozen)

    @contextmanager
    def context(self) -> Iterator[torch.nn.Module]:
        """Yield the module whose forward gives reference log-probs (no grad inside). A separately loaded
        reference runs as loaded: one saved as a LoRA adapter keeps its adapter on (disabling it, as for
        the policy's own adapter, would make pi0 that adapter's base)."""
        if self.frozen is None:
            with reference_context(self.policy) as module:
                yield module
        else:
            with torch.no_grad():
                yield self.frozen


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The policy's weights under the names of its plain base checkpoint, a LoRA adapter folded in.

    For pushing a policy into an inference engine (vLLM) that knows only the base architecture.
    Non-LoRA models give their own state dict. The model is not touched: merging and unmerging in
    place would round the frozen base weights at every sync (in bf16, by up to 2^-8 of their size).
    """
    model = unwrap_model(model)
    if not is_peft_model(model):
        return dict(model.state_dict())
    from peft.tuners.lora import LoraLayer
    deltas = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapters = [a for a in module.active_adapters if a in module.lora_A or a in module.lora_embedding_A]
        if any(getattr(module, "use_dora", {}).get(a, False) for a in adapters):
            raise ValueError(f"{name}: DoRA adapters cannot be folded into the base weights for the engine")
        for adapter in adapters:
            delta = module.get_delta_weight(adapter)
            key = f"{name}.base_layer.weight"
            deltas[key] = deltas[key] + delta if key in deltas else delta
    merged = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name or ".original_module." in name:
            continue  # adapter factors (folded in below) and the frozen copies of modules_to_save
        if name in deltas:
            tensor = tensor + deltas[name].to(tensor.dtype)
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        merged[name.replace(".modules_to_save.default.", ".")] = tensor
    return merged


def stop_at_eos_of(model: torch.nn.Module, tokenizer) -> None:
    """Add the tokenizer's EOS to the model's generation config when missing (a chat run makes the template's
    end-of-turn token the EOS), so `generate` on the saved model stops where training taught it to."""
    config = getattr(unwrap_model(model), "generation_config", None)
    eos = tokenizer.eos_token_id
    if config is None or eos is None:
        return
    current = config.eos_token_id
    ids = list(current) if isinstance(current, (list, tuple)) else [] if current is None else [current]
    if eos not in ids:
        config.eos_token_id = [*ids, eos] if ids else eos


def save_model(model: torch.nn.Module, tokenizer, out_dir, *, merge: bool = False,
               state_dict: dict | None = None) -> Path:
    """Write `model` (safetensors) and `tokenizer` to `out_dir`.

    A PEFT model is saved as its adapter (small; `load_policy` puts it back on the recorded base, and
    the base stays available as the reference). `merge=True` writes a merged full model instead,
    from a copy so the live model keeps its adapter. `state_dict` replaces the model's own (the full
    tensors of an FSDP-sharded model, gathered by every process beforehand).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = unwrap_model(model)
    if is_peft_model(model) and merge:
        if state_dict is not None:
            raise ValueError("save_model: merge=True cannot merge a sharded model's gathered state")
        model = copy.deepcopy(model).merge_and_unload()
    if tokenizer is not None:
        stop_at_eos_of(model, tokenizer)
    extra = {} if state_dict is None else {"state_dict": state_dict}
    with no_transformers_bars():
        model.save_pretrained(str(out), safe_serialization=True, **extra)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
