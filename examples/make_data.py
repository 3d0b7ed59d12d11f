"""Write the small example datasets that `configs/*.yaml` point at (examples/data/).

    python examples/make_data.py            # then: distalign make-tiny --out runs/tiny-llama

Pairs, demonstrations and prompts come from the testbed's synthetic-language world (labels from its
exact target pi*); arithmetic prompts carry an `answer` column for verifiable rewards.
"""
import random
from pathlib import Path

from distalign.testbed.lm import LMWorld
from distalign.testbed.lm_data import demonstrations, preference_pairs, prompt_rows, write_jsonl

OUT = Path(__file__).parent / "data"


def arithmetic(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        rows.append({"prompt": f"What is {a} + {b}? Answer with a number.", "answer": str(a + b)})
    return rows


def main() -> None:
    world = LMWorld.create(seed=0)
    world.save(OUT / "world.json")
    write_jsonl(OUT / "pairs.jsonl", preference_pairs(world, 512, seed=1))
    write_jsonl(OUT / "pairs_eval.jsonl", preference_pairs(world, 128, seed=2))
    write_jsonl(OUT / "demos.jsonl", demonstrations(world, 512, seed=3))
    write_jsonl(OUT / "demos_eval.jsonl", demonstrations(world, 128, seed=4))
    write_jsonl(OUT / "prompts.jsonl", prompt_rows(world, 256, seed=5))
    write_jsonl(OUT / "arithmetic.jsonl", arithmetic(256, seed=6))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
