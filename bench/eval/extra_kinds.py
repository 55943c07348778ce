"""Experiment (session 10, not shipped): five more trained-on task kinds from the suite's offline sources.

Writes one JSONL task file per kind (records {"input", "output"}, the kind's 3 templates on its first records) for
`atv train --task-files ...`; the kinds are trained on only, never evaluated, and mirror no held-out task:
word_pos (noun / verb / adjective), noun_category (animal / food / body part / person, WordNet lexicographer
files), word_plural, number_round (to the nearest ten) and number_larger (of two). Result in README, Method
quality, "Tried and not shipped", and bench/eval/extra_kinds/compare.txt.

Usage: python bench/eval/extra_kinds.py OUT_DIR [--cache-dir DIR]   (fetches like data/build_tasks.py)
"""
import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "data"))
import build_tasks as b  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("out", type=Path)
parser.add_argument("--cache-dir", type=Path, default=b.default_cache())
args = parser.parse_args()
args.cache_dir.mkdir(parents=True, exist_ok=True)
b.fetch_pinned(args.cache_dir)
b.fetch_debs(args.cache_dir)
OUT = args.out
N = 210
src = b.unpack(args.cache_dir)
ranks = b.word_ranks(src)
wn = src.wordnet_dir
counts = b.read_sense_counts(wn)  # (lemma, pos, offset) -> tags

lexfile = {}
for line in (wn / "data.noun").read_text().splitlines():
    if line.startswith("  "):
        continue
    f = line.split()
    lexfile[int(f[0])] = int(f[1])

per_word = defaultdict(lambda: defaultdict(int))   # word -> pos -> tags
dominant = {}                                       # word -> (tags, pos, offset)
for (lemma, pos, offset), c in counts.items():
    per_word[lemma][pos] += c
    if c > dominant.get(lemma, (-1,))[0]:
        dominant[lemma] = (c, pos, offset)


def common(word, top):
    return word.isalpha() and 3 <= len(word) <= 10 and ranks.get(word, 10**9) < top


def balanced(groups, rng, n):
    labels = sorted(groups)
    each = n // len(labels)
    out = []
    for lab in labels:
        pool = sorted(groups[lab])
        rng.shuffle(pool)
        out += [(w, lab) for w in pool[:each]]
    rng.shuffle(out)
    return out


def word_pos(rng):
    names = {"noun": "noun", "verb": "verb", "adj": "adjective"}
    groups = defaultdict(list)
    for w, by in per_word.items():
        total = sum(by.values())
        if not common(w, 8000) or total < 5:
            continue
        pos, c = max(by.items(), key=lambda kv: kv[1])
        if pos in names and c >= 0.95 * total:
            groups[names[pos]].append(w)
    print("word_pos", {k: len(v) for k, v in groups.items()})
    return balanced(groups, rng, N)


BLOCK = {"pussy", "cock", "ass", "tit", "dick", "bitch", "bastard", "whore", "nigger", "fag"}


def noun_category(rng):
    names = {5: "animal", 13: "food", 8: "body part", 18: "person"}
    groups = defaultdict(list)
    for w, (c, pos, off) in dominant.items():
        total = sum(per_word[w].values())
        if pos == "noun" and common(w, 20000) and w not in BLOCK and c >= 2 and c >= 0.6 * total and lexfile.get(off) in names:
            groups[names[lexfile[off]]].append(w)
    print("noun_category", {k: len(v) for k, v in groups.items()})
    m = min(len(v) for v in groups.values())
    return balanced(groups, rng, min(N, m * len(groups)))


def plural(word, exc):
    if word in exc:
        return exc[word]
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def word_plural(rng):
    exc, plurals = {}, set()
    for line in (wn / "noun.exc").read_text().splitlines():
        p, s = line.split()[:2]
        plurals.add(p)
        if p.isalpha() and s.isalpha():
            exc.setdefault(s, p)
    words = [w for w, by in per_word.items() if common(w, 5000) and by.get("noun", 0) >= 0.9 * sum(by.values())
             and sum(by.values()) >= 3 and not w.endswith("s") and w not in plurals and w not in BLOCK]
    words.sort()
    rng.shuffle(words)
    print("word_plural", len(words))
    pairs = [(w, plural(w, exc)) for w in words]
    return [(w, p) for w, p in pairs if ranks.get(p, 10**9) < 30000][:N]


def number_round(rng):
    return [(str(x), str(10 * round(x / 10))) for x in rng.sample([x for x in range(11, 999) if x % 5], N)]


def number_larger(rng):
    pairs = rng.sample([(a, c) for a in range(10, 100) for c in range(10, 100) if a != c], N)
    return [(f"{a} or {c}", str(max(a, c))) for a, c in pairs]


KINDS = {
    "word_pos": (word_pos, ['Q: Is "{input}" a noun, a verb or an adjective?\nA:', "Word: {input}\nPart of speech:",
                            'In grammar, the word "{input}" is a']),
    "noun_category": (noun_category, ['Q: Is a {input} an animal, a plant, a food, a body part or a person?\nA:',
                                      "Thing: {input}\nCategory:", "A {input} belongs to the category"]),
    "word_plural": (word_plural, ['Q: What is the plural of "{input}"?\nA:', "Singular: {input}\nPlural:",
                                  "One {input}, two"]),
    "number_round": (number_round, ["Q: What is {input} rounded to the nearest ten?\nA:",
                                    "Number: {input}\nRounded to tens:", "{input} rounded to the nearest ten is"]),
    "number_larger": (number_larger, ["Q: Which number is larger, {input}?\nA:", "Numbers: {input}\nLarger:",
                                      "The larger of {input} is"]),
}

OUT.mkdir(parents=True, exist_ok=True)
for name, (fn, templates) in KINDS.items():
    pairs = fn(random.Random(f"0:{name}"))
    with open(OUT / f"{name}.jsonl", "w") as fh:
        for i, (x, y) in enumerate(pairs):
            rec = {"input": x, "output": y}
            if i < len(templates):
                rec["template"] = templates[i]
            fh.write(json.dumps(rec) + "\n")
    print(name, len(pairs), pairs[:6])
