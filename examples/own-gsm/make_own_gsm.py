"""Writes own_gsm_train.jsonl (one worked example per template: the few-shot pool) and own_gsm_test.jsonl (50
problems): grade-school word problems with numeric answers in GSM8K's layout (a worked answer ending in ``#### N``),
from templates written for quantkit (CC0, see LICENSE). Seeded: ``python examples/own-gsm/make_own_gsm.py``
rewrites both files byte for byte."""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = [("Tom", "he"), ("Ana", "she"), ("Sam", "he"), ("Lea", "she"), ("Ravi", "he"), ("Mia", "she"),
         ("Ben", "he"), ("Zoe", "she"), ("Omar", "he"), ("Ines", "she")]


def _problems(rng: random.Random):
    n, p = rng.choice(NAMES)
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 5)
    k = rng.randint(2, 6)
    return [
        (f"{n} has {a} apples. Then {p} buys {b} more apples. How many apples does {n} have now?",
         f"{n} has {a} + {b} = {a + b} apples.", a + b),
        (f"{n} had {a + b} pencils and gave {b} of them to a friend. How many pencils does {n} have left?",
         f"{n} has {a + b} - {b} = {a} pencils left.", a),
        (f"There are {a} boxes with {b} eggs in each box. How many eggs are there in all?",
         f"There are {a} * {b} = {a * b} eggs.", a * b),
        (f"A bag holds {a} marbles. {n} puts {b} more marbles in and then takes {c} out. How many marbles are in "
         "the bag?", f"The bag holds {a} + {b} - {c} = {a + b - c} marbles.", a + b - c),
        (f"{n} reads {a} pages every day for {b} days. How many pages does {p} read in total?",
         f"{n} reads {a} * {b} = {a * b} pages.", a * b),
        (f"{k} children share {k * a} cookies equally. How many cookies does each child get?",
         f"Each child gets {k * a} / {k} = {a} cookies.", a),
        (f"A shop sold {a} cups in the morning and {b} cups in the afternoon. How many cups did it sell that day?",
         f"The shop sold {a} + {b} = {a + b} cups.", a + b),
        (f"{n} is {a} years old. {n}'s sister is {b} years older. How old is the sister?",
         f"The sister is {a} + {b} = {a + b} years old.", a + b),
        (f"A train has {a + b} cars. {b} cars are taken off. How many cars are left?",
         f"The train has {a + b} - {b} = {a} cars left.", a),
        (f"{n} buys {a} packs of stickers with {b} stickers in each pack and gives away {c} stickers. How many "
         f"stickers does {n} keep?", f"{n} has {a} * {b} = {a * b} stickers and keeps {a * b} - {c} = "
         f"{a * b - c} stickers.", a * b - c),
    ]


def splits(n_test: int = 50, seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    train = [{"question": q, "answer": f"{w}\n#### {v}"} for q, w, v in _problems(rng)]
    seen = {r["question"] for r in train}
    test: list[dict] = []
    while len(test) < n_test:
        probs = _problems(rng)
        q, w, v = probs[rng.randrange(len(probs))]
        if q not in seen:
            seen.add(q)
            test.append({"question": q, "answer": f"{w}\n#### {v}"})
    return {"train": train, "test": test}


if __name__ == "__main__":
    for split, items in splits().items():
        dest = Path(__file__).with_name(f"own_gsm_{split}.jsonl")
        dest.write_text("".join(json.dumps(r) + "\n" for r in items))
        print(f"wrote {dest} ({len(items)} problems)")
