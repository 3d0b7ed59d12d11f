"""Loading: tokenizers, dtypes, LoRA and its disabled-adapter reference, saving, one-line errors."""
import huggingface_hub.constants
import pytest
import torch

from distalign.models import (
    ModelLoadError,
    ReferenceModel,
    collate_sequences,
    is_peft_model,
    load_policy,
    load_reward_model,
    load_tokenizer,
    make_tiny,
    make_tiny_reward_model,
    reference_context,
    save_model,
    sequence_logps,
)

PROMPTS, RESPONSES = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    llama = make_tiny(root / "llama", arch="llama", hidden_size=32)
    return {"llama": llama, "qwen2": make_tiny(root / "qwen2", arch="qwen2", hidden_size=32, tokenizer_dir=llama),
            "rm": make_tiny_reward_model(root / "rm", arch="gpt_neox", hidden_size=32, tokenizer_dir=llama)}


def logps_of(model):
    batch = collate_sequences(PROMPTS, RESPONSES, pad_token_id=0)
    with torch.no_grad():
        return sequence_logps(model, batch)[0]


def perturb_adapter(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)


def test_tokenizer_keeps_saved_class_for_qwen2(tiny):
    # AutoTokenizer alone would pick Qwen2Tokenizer by model type and add an `<|endoftext|>` token.
    tok, reference = load_tokenizer(tiny["qwen2"]), load_tokenizer(tiny["llama"])
    assert len(tok) == len(reference) and tok.get_vocab() == reference.get_vocab()
    assert tok("12 + 7").input_ids == reference("12 + 7").input_ids


@pytest.mark.parametrize("dtype,expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_policy_dtype(tiny, dtype, expected):
    model = load_policy(tiny["llama"], dtype=dtype)
    assert next(model.parameters()).dtype == expected and not is_peft_model(model)


def test_missing_local_path_is_one_line_error(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load_policy(tmp_path / "does-not-exist")
    message = str(info.value)
    assert message.startswith(f"model '{tmp_path / 'does-not-exist'}': not a local folder and not reachable "
                              "on the Hugging Face Hub: ") and "\n" not in message
    assert isinstance(info.value, ValueError)


def test_unreachable_hub_id_is_one_line_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying
    with pytest.raises(ModelLoadError, match=r"^model 'nobody/no-such-model': not a local folder and not "
                                             r"reachable on the Hugging Face Hub: ") as info:
        load_tokenizer("nobody/no-such-model")
    assert "\n" not in str(info.value)


def test_bad_dtype_and_lora_keys(tiny):
    with pytest.raises(ValueError, match="dtype: unknown value 'fp8'"):
        load_policy(tiny["llama"], dtype="fp8")
    with pytest.raises(ValueError, match=r"lora: unknown key\(s\) \['rank'\]"):
        load_policy(tiny["llama"], lora={"rank": 4})


def test_lora_reference_is_base_with_adapter_disabled(tiny):
    base = logps_of(load_policy(tiny["llama"]))
    policy = load_policy(tiny["llama"], lora={"r": 4, "alpha": 8})
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in trainable if "lora_A" in n} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    torch.testing.assert_close(logps_of(policy), base, rtol=0, atol=1e-6)  # lora_B starts at zero
    perturb_adapter(policy)
    assert (logps_of(policy) - base).abs().max() > 1e-3
    with reference_context(policy) as ref:
        torch.testing.assert_close(logps_of(ref), base, rtol=0, atol=1e-6)
        assert not torch.is_grad_enabled()
    assert (logps_of(policy) - base).abs().max() > 1e-3  # the adapter is back on after the context
    with ReferenceModel.for_policy(policy).context() as ref:
        torch.testing.assert_close(logps_of(ref), base, rtol=0, atol=1e-6)


def test_full_weight_reference_is_frozen_copy(tiny):
    policy = load_policy(tiny["llama"])
    reference = ReferenceModel.for_policy(policy, tiny["llama"])
    assert reference.frozen is not policy and not reference.frozen.training
    assert not any(p.requires_grad for p in reference.frozen.parameters())
    with reference.context() as ref:
        torch.testing.assert_close(logps_of(ref), logps_of(policy), rtol=0, atol=0)
    with pytest.raises(ValueError, match="reference: a full-weight policy needs"):
        ReferenceModel.for_policy(policy)


def test_save_adapter_and_merged(tiny, tmp_path):
    policy = load_policy(tiny["llama"], lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    perturb_adapter(policy)
    expected = logps_of(policy)
    tokenizer = load_tokenizer(tiny["llama"])
    adapter_dir = save_model(policy, tokenizer, tmp_path / "adapter")
    assert (adapter_dir / "adapter_model.safetensors").is_file() and not (adapter_dir / "config.json").exists()
    reloaded = load_policy(adapter_dir)
    assert is_peft_model(reloaded) and not any(p.requires_grad for p in reloaded.parameters())
    torch.testing.assert_close(logps_of(reloaded), expected, rtol=0, atol=1e-5)
    assert any(p.requires_grad for p in load_policy(adapter_dir, lora={}).parameters())
    merged_dir = save_model(policy, tokenizer, tmp_path / "merged", merge=True)
    assert (merged_dir / "model.safetensors").is_file() and is_peft_model(policy)  # live model untouched
    merged = load_policy(merged_dir)
    assert not is_peft_model(merged)
    torch.testing.assert_close(logps_of(merged), expected, rtol=0, atol=1e-5)
    assert len(load_tokenizer(merged_dir)) == len(tokenizer)


def test_reference_saved_as_an_adapter_keeps_its_adapter(tiny, tmp_path):
    """`reference=` a LoRA run's final/ (an adapter folder): pi0 is base + that adapter, not the bare base
    (the policy's own adapter is what gets disabled)."""
    sft = load_policy(tiny["llama"], lora={"r": 4, "alpha": 8})
    perturb_adapter(sft)
    expected = logps_of(sft)
    adapter_dir = save_model(sft, load_tokenizer(tiny["llama"]), tmp_path / "sft")
    policy = load_policy(tiny["llama"], lora={"r": 4, "alpha": 8})
    with ReferenceModel.for_policy(policy, adapter_dir).context() as ref:
        torch.testing.assert_close(logps_of(ref), expected, rtol=0, atol=1e-5)
        assert not torch.is_grad_enabled()
    assert (expected - logps_of(load_policy(tiny["llama"]))).abs().max() > 1e-3


def test_reward_model_with_lora_trains_head(tiny):
    model = load_reward_model(tiny["rm"], lora={"r": 2})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    scores = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert scores.shape == (1, 1)


def test_reward_model_from_causal_checkpoint_gets_pad_id(tiny):
    model = load_reward_model(tiny["llama"], pad_token_id=0)
    assert model.config.num_labels == 1 and model.config.pad_token_id == 0
    assert model(input_ids=torch.tensor([[5, 6, 0]])).logits.shape == (1, 1)


def test_lora_reference_runs_in_eval_mode_inside_a_training_policy(tiny):
    """A policy in train mode with dropout: the reference forward must not draw dropout."""
    base = load_policy(tiny["llama"]).eval()
    policy = load_policy(tiny["llama"], lora={"r": 4, "alpha": 8})
    for module in policy.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    policy.train()
    torch.manual_seed(0)
    assert (logps_of(policy) - logps_of(policy)).abs().max() > 1e-3  # dropout is live in train mode
    with reference_context(policy) as ref:
        torch.testing.assert_close(logps_of(ref), logps_of(base), rtol=0, atol=1e-6)
    assert policy.training and all(m.training for m in policy.modules())  # train mode is restored


def test_loading_and_saving_show_no_transformers_bars(tiny, tmp_path, capfd):
    """transformers' "Loading weights" / "Writing model shards" bars are not ours to show; a caller's
    own setting of them is restored afterwards."""
    from transformers.utils import logging as hf_logging
    assert hf_logging.is_progress_bar_enabled()
    save_model(load_policy(tiny["llama"]), None, tmp_path / "saved")
    load_reward_model(tiny["rm"])
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err, err
    assert hf_logging.is_progress_bar_enabled()
