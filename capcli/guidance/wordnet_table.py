"""Build the table of caption words each ImageNet class supports, from WordNet (run once; the result ships).

    python -m capcli.guidance.wordnet_table /usr/share/wordnet     # Debian's wordnet-base: WordNet 3.0

A class supports the nouns of its own synset and of its hypernyms up to `MAX_DEPTH` levels up (tabby -> domestic
cat -> cat; Cardigan corgi -> corgi -> dog; missile -> rocket), each multi-word lemma by its head, the last word
("coffee mug" -> mug, "tiger cat" -> cat, never "tiger") when the thing is a kind of what the head names (a
hot dog is no dog, a teddy bear no bear), each with the number of levels up it was found at.
Capitalised lemmas (Latin genus names, places: "Felis catus", "Pembroke") are left out, and hypernyms above the
level of things a caption names (object, artifact, organism, ...) are never reached, nor are their words used.
Classes below "animal" are marked (`capcli.guidance` guards only animal words), and the words many animal classes
support get their kinds, which a guard holds back with the word: the heads of their direct hyponyms whose
commonest sense is an animal and that are no verbs (dog -> puppy, poodle, pug; deeper hyponyms, like the sea
horse under fish, are other things, and "fly" names an action more often than an insect in captions). The 1,000
classes' WordNet ids and names come from timm's copy of the ImageNet class list (the usual order of the
1000-class heads). WordNet is read from its own data files (wndb(5WN) format): no WordNet library is needed,
and nothing here runs when captioning.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

MAX_DEPTH = 3  # hypernym levels above a class whose nouns it still supports
ANIMAL = "00015388"  # animal.n.01: classes below it are marked (photos of animals are what a classifier rules out
# reliably: ImageNet has 398 animal classes, and no class at all for people)
# Synsets too general to name what a photo shows: a class's words stop before them.
TOO_GENERAL = {
    "entity", "physical_entity", "abstraction", "object", "whole", "artifact", "artefact", "instrumentality",
    "instrumentation", "organism", "being", "living_thing", "animate_thing", "matter", "substance", "unit",
    "causal_agent", "thing", "device", "container", "structure", "construction", "commodity", "covering",
    "equipment", "implement", "vertebrate", "craniate", "chordate", "invertebrate", "placental", "mammal",
    "eutherian_mammal", "placental_mammal", "carnivore", "ungulate", "food", "nutrient", "solid", "part", "piece",
    "system", "conveyance", "transport", "way", "area", "region", "location", "geological_formation", "formation",
    "creation", "product", "merchandise", "ware", "consumer_goods", "durables", "durable_goods",
}
# Words that name other, commoner things in captions than the lemma they head ("a runner", "his arm"), or nothing.
NOT_CAPTION_WORDS = TOO_GENERAL | {"being", "stuff", "material", "machine", "instrument", "runner", "arm", "java",
                                   "wear", "article", "form", "system", "communication", "signaling"}
OUT = Path(__file__).with_name("imagenet-1k.json")
KINDS_COVERAGE = 5  # words that this many animal classes support get their kinds listed
hyponyms: dict[str, list[str]] = {}  # offset -> hyponym offsets, filled by read_nouns


def read_nouns(wordnet: Path) -> dict[str, tuple[list[str], list[str]]]:
    """data.noun -> {offset: (lemmas, hypernym offsets)}; lemmas as WordNet writes them, with underscores.
    Each synset's hyponyms go to the module's `hyponyms` map."""
    nouns: dict[str, tuple[list[str], list[str]]] = {}
    with open(wordnet / "data.noun", encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # the licence header
                continue
            fields = line.split(" | ", 1)[0].split()
            offset, count = fields[0], int(fields[3], 16)
            lemmas = [fields[4 + 2 * i] for i in range(count)]
            at = 4 + 2 * count
            pointers = int(fields[at])
            pointer = [(fields[at + 1 + 4 * i], fields[at + 2 + 4 * i]) for i in range(pointers)]
            nouns[offset] = ([_plain(lemma) for lemma in lemmas], [o for s, o in pointer if s in ("@", "@i")])
            hyponyms[offset] = [o for s, o in pointer if s in ("~", "~i")]
    return nouns


def read_index(wordnet: Path, pos: str = "noun") -> dict[str, list[str]]:
    """index.noun (or index.verb, ...) -> {lemma: its synset offsets, most frequent sense first}."""
    index: dict[str, list[str]] = {}
    with open(wordnet / f"index.{pos}", encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):
                continue
            fields = line.split()
            index[fields[0]] = fields[-int(fields[2]):]
    return index


def _plain(lemma: str) -> str:
    """A lemma without WordNet's adjective markers ('(a)', '(p)'), which nouns do not use but some files carry."""
    return lemma.split("(")[0]


def imagenet_classes() -> list[tuple[str, str]]:
    """(WordNet id, name) of the 1,000 ImageNet classes, in the order of the classification heads."""
    spec = importlib.util.find_spec("timm")  # the package's files, without importing it (or torch)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("timm is needed for the ImageNet class list: pip install timm")
    info = Path(next(iter(spec.submodule_search_locations))) / "data" / "_info"
    ids = (info / "imagenet_synsets.txt").read_text().split()
    names = dict(line.split("\t", 1) for line in (info / "imagenet_synset_to_lemma.txt").read_text().splitlines())
    return [(wnid, names[wnid].strip()) for wnid in ids]


def class_words(offset: str, nouns: dict[str, tuple[list[str], list[str]]], index: dict[str, list[str]]) -> list[list]:
    """[word, levels up] pairs a class supports, nearest first, each word once."""
    found: dict[str, int] = {}
    frontier, seen = [offset], {offset}
    for depth in range(MAX_DEPTH + 1):
        following = []
        for node in frontier:
            lemmas, hypernyms = nouns[node]
            if depth and any(lemma.lower() in TOO_GENERAL for lemma in lemmas):
                continue
            for lemma in lemmas:
                head = lemma.split("_")[-1].replace("-", "").lower()
                if lemma[:1].islower() and head not in NOT_CAPTION_WORDS and _kind_of(node, lemma, head, nouns, index):
                    found.setdefault(head, depth)
            following += [h for h in hypernyms if h not in seen]
            seen.update(hypernyms)
        frontier = following
    return [[word, depth] for word, depth in found.items() if word.isalpha()]


def _kind_of(node: str, lemma: str, head: str, nouns, index: dict[str, list[str]]) -> bool:
    """Whether a synset named `lemma` is a kind of what its head word names (always, for a one-word lemma)."""
    if "_" not in lemma and "-" not in lemma:
        return True
    return bool(set(index.get(head, ())) & (ancestors(node, nouns) | {node}))


def ancestors(offset: str, nouns: dict[str, tuple[list[str], list[str]]]) -> set[str]:
    found, frontier = set(), [offset]
    while frontier:
        node = frontier.pop()
        for parent in nouns[node][1]:
            if parent not in found:
                found.add(parent)
                frontier.append(parent)
    return found


def kinds(word: str, index: dict[str, list[str]], nouns) -> list[str]:
    """The one-word heads of the direct kinds of the animal `word` (the hyponyms of its animal senses) that are
    kinds of what they name and whose commonest sense is an animal ("puppy", not a person's sense first)."""
    found = set()
    for sense in (s for s in index.get(word, ()) if ANIMAL in ancestors(s, nouns)):
        for node in hyponyms.get(sense, ()):
            for lemma in nouns[node][0]:
                head = lemma.split("_")[-1].replace("-", "").lower()
                if (lemma[:1].islower() and head.isalpha() and head != word and _animal_first(head, index, nouns)
                        and _kind_of(node, lemma, head, nouns, index)):
                    found.add(head)
    return sorted(found)


def build(wordnet: Path) -> dict:
    nouns, index = read_nouns(wordnet), read_index(wordnet)
    classes = [{"id": wnid, "name": name, "words": class_words(wnid[1:], nouns, index),
                "animal": ANIMAL in ancestors(wnid[1:], nouns)} for wnid, name in imagenet_classes()]
    counts: dict[str, int] = {}
    for c in classes:
        for word, _ in c["words"] if c["animal"] else ():
            counts[word] = counts.get(word, 0) + 1
    animal_words = sorted(w for w, n in counts.items() if n >= KINDS_COVERAGE)
    verbs = read_index(wordnet, "verb")
    found = {w: [k for k in kinds(w, index, nouns) if k not in verbs] for w in animal_words}
    return {"labels": "imagenet-1k", "source": f"WordNet 3.0 hypernyms, up to {MAX_DEPTH} levels (capcli.guidance."
            "wordnet_table)", "classes": classes, "kinds": found}


def _animal_first(word: str, index: dict[str, list[str]], nouns) -> bool:
    senses = index.get(word, ())
    return bool(senses) and ANIMAL in ancestors(senses[0], nouns)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wordnet", type=Path, help="folder holding WordNet 3.0's data.noun (Debian: /usr/share/wordnet)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    table = build(args.wordnet)
    args.out.write_text(json.dumps(table, indent=0, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(table['classes'])} classes -> {args.out}")


if __name__ == "__main__":
    main()
