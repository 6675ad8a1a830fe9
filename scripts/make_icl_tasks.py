"""Writes the shipped synthetic ICL task suite into llmfoundry_lite/eval/tasks/ (`python scripts/make_icl_tasks.py`).

Written for this repository, not taken from any benchmark. Every task can be solved from the text
of the prompt alone (arithmetic aside), by copying or by a few-shot pattern, so a tiny model
trained for minutes can score above chance and a checkpoint's progress is visible:

  arithmetic.jsonl       language_modeling   "3 + 4 =" -> "7"
  facts.jsonl            multiple_choice     "Zib has a red cup. The cup of Zib is" -> red | blue | green
  copy_reverse.jsonl     generation_task_with_answers   "copy: k m p ->" -> "k m p"; reverse -> "p m k"
  colour_schema.jsonl    schema              which context ("The cup is red." / "... blue.") predicts "red"
"""
import json
import os
import random

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "llmfoundry_lite", "eval", "tasks")
NAMES = ["Zib", "Mora", "Tek", "Lufa", "Pim", "Dorn", "Vesa", "Kal", "Nimo", "Roan", "Sel", "Tova"]
THINGS = ["cup", "hat", "box", "ball", "coat", "door", "car", "book"]
COLOURS = ["red", "blue", "green", "black", "white", "brown"]


def arithmetic(rng):
    pairs = [(a, b) for a in range(10) for b in range(10)]
    return [{"context": f"{a} + {b} =", "continuation": str(a + b)} for a, b in rng.sample(pairs, 100)]


def facts(rng):
    out = []
    for _ in range(100):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        choices = rng.sample(COLOURS, 3)
        gold = rng.randrange(3)
        out.append({"query": f"{name} has a {choices[gold]} {thing}. The {thing} of {name} is",
                    "choices": choices, "gold": gold})
    return out


def copy_reverse(rng):
    out = []
    for i in range(100):
        letters = rng.sample("abcdefghjkmnprstuvwxyz", rng.randint(2, 4))
        if i % 2:
            out.append({"context": f"reverse: {' '.join(letters)} ->", "answer": " ".join(reversed(letters))})
        else:
            out.append({"context": f"copy: {' '.join(letters)} ->", "answer": " ".join(letters)})
    return out


def colour_schema(rng):
    out = []
    for _ in range(100):
        thing = rng.choice(THINGS)
        right, wrong = rng.sample(COLOURS, 2)
        options = [f"The {thing} is {c}. Again, the {thing} is" for c in (right, wrong)]
        gold = rng.randrange(2)
        if gold:
            options.reverse()
        out.append({"context_options": options, "continuation": right, "gold": gold})
    return out


if __name__ == "__main__":
    for name, make in (("arithmetic", arithmetic), ("facts", facts), ("copy_reverse", copy_reverse),
                       ("colour_schema", colour_schema)):
        with open(os.path.join(HERE, f"{name}.jsonl"), "w") as f:
            for ex in make(random.Random(name)):
                f.write(json.dumps(ex) + "\n")
