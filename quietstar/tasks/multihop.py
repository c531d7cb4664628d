"""A synthetic in-context multi-hop task where only the content of a thought can help (docs/design.md §7).

A document states a random mapping among single-token entities as facts, then asks k-hop queries::

    Facts: cat -> dog. sun -> red. dog -> sun. red -> cat.
    Two steps from cat: sun.
    Two steps from red: dog.

The mapping is one random cycle through the document's entities, so distinct starts have distinct intermediate
entities at every hop: the thought that helps a query (its own intermediates) differs for every query of the
document, filler cannot help, and another query's thought is plausible but wrong. The answer is the single token
right after the query's ``:``, so the thought at the position before it (the ``:``) is the one that helps.

Documents are generated for any tokenizer: entities are words whose text, after a space, is exactly one token in
context (``" cat"`` in a BPE vocabulary; ``"c"`` after a separate space token in a byte-level one). Document i of a
split depends only on (split, seed, i); "train" and "heldout" are disjoint seed streams.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

SPLITS = ("train", "heldout")
# Short, common nouns: single tokens (with a leading space) in most BPE vocabularies. None is a word of the query
# template, so an entity is never confused with it.
ENTITY_WORDS = (
    "cat", "dog", "sun", "red", "box", "car", "hat", "cup", "pen", "map", "bed", "egg", "fox", "key", "owl", "pig",
    "rat", "bee", "cow", "ant", "bus", "fan", "jar", "kid", "log", "net", "pot", "rug", "toy", "van", "web", "bag",
    "bat", "bow", "bun", "can", "gem", "gum", "ice", "ink", "jam", "leg", "lid", "mud", "nut", "oak", "pin", "sea",
    "sky", "tea", "tin", "tip", "zoo", "book", "bird", "boat", "cake", "coin", "door", "duck", "fish", "frog", "gold",
    "hill", "king", "lake", "lamp", "leaf", "lion", "milk", "moon", "nest", "rain", "ring", "road", "rock", "rose",
    "salt", "sand", "ship", "shoe", "snow", "star", "tree", "wind", "wolf", "wood", "apple", "bread", "chair", "cloud",
    "horse", "house", "river", "stone", "table", "tiger", "train", "water", "green", "blue", "black", "white", "queen",
)
# The fallback for character-level tokenizers, where no word is one token.
ENTITY_LETTERS = tuple(string.ascii_letters)
HOP_PHRASES = {1: "One step", 2: "Two steps", 3: "Three steps", 4: "Four steps", 5: "Five steps"}


@dataclass(frozen=True)
class MultihopSpec:
    """The shape of a document."""

    hops: int = field(default=2, metadata={"help": "k: steps from a query's start to its answer (k - 1 between)."})
    num_entities: int = field(default=8, metadata={"help": "Entities (and facts) per document."})
    num_queries: int = field(default=6, metadata={"help": "Queries per document, from distinct starts."})

    def __post_init__(self):
        if self.hops not in HOP_PHRASES:
            raise ValueError(f"hops must be one of {sorted(HOP_PHRASES)}, got {self.hops}.")
        if self.num_entities < max(2 * self.hops, 3):
            raise ValueError(f"num_entities ({self.num_entities}) must be at least max(2 * hops, 3) = "
                             f"{max(2 * self.hops, 3)}: a query's chain holds hops + 1 entities and the wrong-gold "
                             "view needs hops - 1 others.")
        if not 2 <= self.num_queries <= self.num_entities:
            raise ValueError(f"num_queries must be between 2 (the shuffled view needs another query) and num_entities "
                             f"({self.num_entities}), got {self.num_queries}.")


@dataclass(frozen=True)
class Entity:
    text: str  # the word, without its leading space
    token_id: int  # the one token it is in context


@dataclass(frozen=True)
class Query:
    """One k-hop query. ``answer_index``: the answer's token index in the document's ids; the thought that helps sits
    at ``answer_index - 1``. ``decoys``: k - 1 entities of the document outside this query's chain (start,
    intermediates, answer), the wrong-gold thought and the chance rate of the content check."""

    start: Entity
    intermediates: tuple[Entity, ...]  # k - 1, in hop order
    answer: Entity
    decoys: tuple[Entity, ...]  # k - 1
    answer_char: int  # where the answer word starts in the text
    answer_index: int


@dataclass(frozen=True)
class MultihopDocument:
    text: str
    input_ids: tuple[int, ...]  # with the special tokens the tokenizer adds (as training tokenizes)
    entities: tuple[Entity, ...]  # the document's entities: the candidates an answer is chosen among
    queries: tuple[Query, ...]

    @property
    def candidate_ids(self) -> tuple[int, ...]:
        return tuple(entity.token_id for entity in self.entities)


def _single_token(tokenizer, word: str) -> int | None:
    """The token ``word`` is after a space when that is one token (" cat", or "c" after a separate space token)."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if len(ids) == 1 and tokenizer.decode(ids) == " " + word:
        return ids[0]
    if len(ids) == 2 and tokenizer.decode(ids[:1]) == " " and tokenizer.decode(ids[1:]) == word:
        return ids[1]
    return None


def entity_pool(tokenizer, minimum: int) -> tuple[Entity, ...]:
    """The entities a tokenizer can use, in a fixed order: the words of ENTITY_WORDS that are one token; for a
    tokenizer with fewer than ``minimum`` such words (a character-level one), the single-token letters instead.
    Raises ValueError when fewer than ``minimum`` qualify either way."""
    for candidates in (ENTITY_WORDS, ENTITY_LETTERS):
        pool, seen = [], set()
        for word in candidates:
            token = _single_token(tokenizer, word)
            if token is not None and token not in seen:
                pool.append(Entity(word, token))
                seen.add(token)
        if len(pool) >= minimum:
            return tuple(pool)
    raise ValueError(f"The tokenizer has too few single-token entities for this task: {minimum} needed (twice the "
                     f"entities per document), found {len(pool)} among {len(ENTITY_WORDS)} short words and "
                     f"{len(ENTITY_LETTERS)} letters. Lower num_entities or use another tokenizer.")


class MultihopGenerator:
    """Documents of ``spec`` for ``tokenizer``: ``generator.document(index, seed, split)``."""

    def __init__(self, tokenizer, spec: MultihopSpec | None = None):
        self.tokenizer = tokenizer
        self.spec = spec or MultihopSpec()
        self.pool = entity_pool(tokenizer, 2 * self.spec.num_entities)

    def document(self, index: int, seed: int = 0, split: str = "train") -> MultihopDocument:
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; use one of {SPLITS}.")
        spec = self.spec
        # The key leaves out the hops, so the same (split, seed, index) has the same mapping and starts at every k.
        rng = random.Random(f"synthetic-multihop/{split}/{seed}/{index}")
        cycle = rng.sample(self.pool, spec.num_entities)
        successor = {cycle[i]: cycle[(i + 1) % len(cycle)] for i in range(len(cycle))}
        facts = list(cycle)
        rng.shuffle(facts)
        starts = rng.sample(cycle, spec.num_queries)

        text = "Facts:" + "".join(f" {e.text} -> {successor[e].text}." for e in facts)
        mentions = []  # (char, entity) of every entity mention, checked against the tokenization below
        position = len("Facts:")
        for e in facts:
            mentions += [(position + 1, e), (position + 5 + len(e.text), successor[e])]
            position += len(f" {e.text} -> {successor[e].text}.")
        chains = []
        for start in starts:
            chain = [start]
            for _ in range(spec.hops):
                chain.append(successor[chain[-1]])
            others = [e for e in cycle if e not in chain]
            prompt = f"\n{HOP_PHRASES[spec.hops]} from {start.text}:"
            mentions.append((len(text) + len(prompt) - len(start.text) - 1, start))
            answer_char = len(text) + len(prompt) + 1
            mentions.append((answer_char, chain[-1]))
            text += f"{prompt} {chain[-1].text}."
            chains.append((chain, tuple(rng.sample(others, spec.hops - 1)), answer_char))

        encoded = self.tokenizer(text, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        index_at = {start: i for i, (start, end) in enumerate(offsets) if end > start}
        token_of = {}
        for char, entity in mentions:
            # The entity's token starts at its space (" cat"), or at its first character (after a space token, or
            # where the tokenizer trims offsets), and ends with the word.
            for first in (char - 1, char):
                token = index_at.get(first)
                if token is not None and ids[token] == entity.token_id and offsets[token][1] == char + len(entity.text):
                    break
            else:
                raise ValueError(f"The entity {entity.text!r} is not the single token {entity.token_id} at character "
                                 f"{char} of a generated document: this tokenizer merges it with its neighbours. "
                                 f"Document: {text!r}")
            token_of[char] = token
        queries = tuple(Query(start=chain[0], intermediates=tuple(chain[1:-1]), answer=chain[-1], decoys=decoys,
                              answer_char=answer_char, answer_index=token_of[answer_char])
                        for chain, decoys, answer_char in chains)
        return MultihopDocument(text=text, input_ids=tuple(ids), entities=tuple(cycle), queries=queries)

    def documents(self, count: int, seed: int = 0, split: str = "train") -> list[MultihopDocument]:
        """Documents 0 .. count - 1 of ``split``: any prefix of the list is stable."""
        return [self.document(index, seed, split) for index in range(count)]


# ----------------------------------------------------------------------------------------------- gold thoughts
def gold_thought(entities: Sequence[Entity], num_thought_tokens: int, filler_id: int) -> list[int]:
    """A thought of T tokens: filler, then the entities' tokens last (right before <|endofthought|>)."""
    if len(entities) > num_thought_tokens:
        raise ValueError(f"{len(entities)} intermediate entities do not fit in a thought of {num_thought_tokens} "
                         "tokens; use more thought tokens.")
    return [filler_id] * (num_thought_tokens - len(entities)) + [entity.token_id for entity in entities]


def gold_intermediates(document: MultihopDocument, hops: int) -> np.ndarray:
    """``[n, k - 1]`` int64 for the document's n tokens: at each query's answer index - 1 (where the thought that helps
    sits) the token ids of the query's intermediate entities in hop order, -1 everywhere else."""
    out = np.full((len(document.input_ids), max(hops - 1, 0)), -1, dtype=np.int64)
    for query in document.queries:
        out[query.answer_index - 1] = [entity.token_id for entity in query.intermediates]
    return out


def insert_gold_thoughts(thoughts: torch.Tensor, intermediates: torch.Tensor, filler_id: int) -> torch.Tensor:
    """``thoughts [B, N, L, T]`` with the thought at every position that has gold ``intermediates [B, L, K]`` (ids,
    -1 where none; see :func:`gold_intermediates`) replaced, in all N thoughts, by :func:`gold_thought`: T - K filler
    tokens, then the K intermediates. Other positions keep their thoughts."""
    B, N, L, T = thoughts.shape
    K = intermediates.shape[-1]
    if tuple(intermediates.shape[:2]) != (B, L):
        raise ValueError(f"intermediates must be [B, L, K] = [{B}, {L}, K] for thoughts of shape {tuple(thoughts.shape)}, "
                         f"got {tuple(intermediates.shape)}.")
    if K > T:
        raise ValueError(f"{K} intermediate entities do not fit in a thought of {T} tokens; use num_thought_tokens >= "
                         f"{K} (hops - 1).")
    has_gold = intermediates[..., 0] >= 0 if K else torch.zeros(B, L, dtype=torch.bool, device=thoughts.device)
    gold = thoughts.new_full((B, L, T), filler_id)
    gold[..., T - K:] = intermediates.to(thoughts.dtype)
    return torch.where(has_gold[:, None, :, None], gold[:, None], thoughts)
