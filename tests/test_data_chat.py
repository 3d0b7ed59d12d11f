"""data.chat_template / data.system: plain prompts through the template, the end-of-turn token as the
response end and EOS, the three modes, and the one-line errors; on a word-level tokenizer built here.
(The same on the real SmolLM2 tokenizer: tests/test_real_model.py.)"""
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from distalign.config import ConfigError, OfflineConfig, load_config
from distalign.config.irl import IRLConfig
from distalign.config.online import OnlineConfig
from distalign.config.online_pairwise import OnlinePairwiseConfig
from distalign.data import (
    ChatFormat,
    DataError,
    end_of_turn_id,
    prepare_tokenizer,
    tokenize_examples,
    tokenize_prompts,
)
from distalign.evaluation.config import EvalConfig
from distalign.training.run_data import chat_format
from distalign.training.sampling import build_sampler

SPECIALS = ["<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
WORDS = ["what", "is", "two", "four", "be", "brief", "hello"]
ID = {t: i for i, t in enumerate(SPECIALS + WORDS)}
PAD, EOS, USER, ASSISTANT, SYSTEM, END = range(6)
# Turns close with <|end|>, which is not the tokenizer's EOS (as Qwen2.5 base tokenizers: <|im_end|> vs
# <|endoftext|>).
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer(chat_template=TEMPLATE):
    backend = Tokenizer(models.WordLevel(ID, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>",
                                        additional_special_tokens=SPECIALS[2:])
    tokenizer.chat_template = chat_template
    return tokenizer


def ids(text):
    return [ID[w] for w in text.split()]


def pair(prompt="what is two", **extra):
    return {"prompt": prompt, "chosen": "four", "rejected": "two", "_row": 1, "_source": "p.jsonl", **extra}


def test_plain_prompt_equals_the_same_prompt_as_messages():
    tok = make_tokenizer()
    plain, messages = tokenize_prompts(["what is two", [{"role": "user", "content": "what is two"}]], tok)
    assert plain == messages == [USER] + ids("what is two") + [END, ASSISTANT]


def test_system_prompt_goes_first_once():
    tok, chat = make_tokenizer(), ChatFormat(system="be brief")
    own = [{"role": "system", "content": "hello"}, {"role": "user", "content": "what is two"}]
    plain, with_own = tokenize_prompts(["what is two", own], tok, chat=chat)
    assert plain == [SYSTEM] + ids("be brief") + [END, USER] + ids("what is two") + [END, ASSISTANT]
    assert with_own == [SYSTEM, ID["hello"], END, USER] + ids("what is two") + [END, ASSISTANT]


def test_responses_end_with_the_end_of_turn_token_and_it_becomes_eos():
    tok = make_tokenizer()
    assert end_of_turn_id(tok) == END and tok.eos_token_id == EOS
    [record], _ = tokenize_examples([pair()], "pairs", tok, max_prompt_length=8, max_length=16)
    assert record.chosen_ids == [ID["four"], END] and record.rejected_ids == [ID["two"], END]
    prepare_tokenizer(tok, ChatFormat())
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<pad>"


def test_never_feeds_text_raw_and_refuses_chat_rows():
    tok, never = make_tokenizer(), ChatFormat("never")
    [record], _ = tokenize_examples([pair()], "pairs", tok, max_prompt_length=8, max_length=16, chat=never)
    assert record.prompt_ids == ids("what is two") and record.chosen_ids == [ID["four"], EOS]
    assert prepare_tokenizer(make_tokenizer(), never).eos_token_id == EOS
    chat_row = pair(prompt=[{"role": "user", "content": "what is two"}], _row=4)
    with pytest.raises(DataError, match=r"^p\.jsonl: row 4: field 'prompt': expected a plain string because "
                                        r"data\.chat_template is 'never', found chat messages"):
        tokenize_examples([chat_row], "pairs", tok, max_prompt_length=8, max_length=16, chat=never)


def test_auto_without_a_template_is_raw_and_always_refuses():
    tok = make_tokenizer(chat_template=None)
    assert tokenize_prompts(["what is two"], tok) == [ids("what is two")]
    with pytest.raises(ValueError, match=r"^chat_template: 'always', but the tokenizer .* has no chat template"):
        tokenize_prompts(["what is two"], tok, chat=ChatFormat("always"))
    with pytest.raises(ValueError, match=r"^system: a system prompt needs a chat template"):
        tokenize_prompts(["what is two"], tok, chat=ChatFormat(system="be brief"))
    with pytest.raises(ValueError, match=r"^chat_template: must be one of \['auto', 'always', 'never'\]"):
        ChatFormat("sometimes")


@pytest.mark.parametrize("schema,extra", [
    (OfflineConfig, ["method=dpo", "data.train=p.jsonl"]),
    (OnlineConfig, ["method=grpo", "data.train=p.jsonl", "rewards=[{kind: exact_answer}]"]),
    (OnlinePairwiseConfig, ["method=spin", "demonstrations=d.jsonl"]),
    (IRLConfig, ["method=irl", "demonstrations=d.jsonl"]),
])
def test_every_config_family_takes_and_checks_the_chat_fields(schema, extra):
    base = ["model.name_or_path=m", *extra]
    cfg = load_config(schema, None, [*base, "data.system=be brief", "data.chat_template=always"])
    assert chat_format(cfg.data) == ChatFormat("always", "be brief")
    with pytest.raises(ConfigError, match=r"data\.system'?: needs the chat template, but chat_template is 'never'"):
        load_config(schema, None, [*base, "data.system=be brief", "data.chat_template=never"])
    with pytest.raises(ConfigError, match=r"data\.chat_template'?: must be one of \['auto', 'always', 'never'\]"):
        load_config(schema, None, [*base, "data.chat_template=sometimes"])


def test_eval_takes_the_chat_keys():
    base = ["policies=[p]", "prompts=x.jsonl", "output_dir=o", "chat_template=never"]
    assert load_config(EvalConfig, None, base).chat_template == "never"
    with pytest.raises(ConfigError, match=r"system'?: needs the chat template, but chat_template is 'never'"):
        load_config(EvalConfig, None, [*base, "system=be brief"])


@pytest.mark.parametrize("backend", ["hf", "generate"])
def test_samplers_stop_at_the_prepared_eos(backend):
    """The online trainers build their sampler from the run tokenizer: its EOS is the end-of-turn token, so
    sampling stops there and a completion without it counts as missing EOS."""
    from distalign.config.online import GenerationConfig
    tok = prepare_tokenizer(make_tokenizer(), ChatFormat())
    sampler = build_sampler(tok, GenerationConfig(backend=backend), "unused")
    assert sampler.eos == END


def test_online_trainer_samples_and_checks_eos_with_the_end_of_turn_token(tmp_path):
    """End to end through the trainer: records end with <|end|>, the sampler stops at it, a rollout's
    missing-EOS flag is about it."""
    import json

    import torch

    from distalign.config import load_config
    from distalign.models import make_tiny
    from distalign.training.online import OnlineTrainer
    make_tokenizer().save_pretrained(str(tmp_path / "tok"))
    model = make_tiny(tmp_path / "model", hidden_size=16, num_layers=1, vocab_size=len(ID),
                      tokenizer_dir=tmp_path / "tok")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "what is two", "answer": "four"}) + "\n")
    cfg = load_config(OnlineConfig, None, [
        "method=grpo", f"model.name_or_path={model}", f"data.train={prompts}", "rewards=[{kind: exact_answer}]",
        f"train.output_dir={tmp_path / 'run'}", "train.batch_size=1", "generation.num_samples=2",
        "generation.max_new_tokens=4", "train.progress_bar=false", "data.max_prompt_length=8"])
    trainer = OnlineTrainer(cfg, log=lambda *_: None)
    assert trainer.tokenizer.eos_token_id == trainer.sampler.eos == END
    assert trainer.records[0].prompt_ids == [USER] + ids("what is two") + [END, ASSISTANT]
    only_end = torch.full((len(ID),), -1e4)
    only_end[END] = 0.0   # the policy puts all its mass on <|end|>: each sample is that one token, and ends
    trainer.policy.lm_head.register_forward_hook(lambda module, inputs, out: torch.zeros_like(out) + only_end)
    batch = trainer.sampler.sample(trainer.policy, [trainer.records[0].prompt_ids] * 2)
    responses = batch.input_ids[:, batch.prompt_length:]
    assert not batch.truncated.any() and (responses[:, 0] == END).all(), responses
