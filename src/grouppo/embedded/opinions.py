"""The embedded opinion data of GDPO: questions on public issues, populations holding belief
distributions over their answer options, responses expressing each option, and the pairs built from them.

Nothing is downloaded: ``make_opinions(seed)`` builds everything from the questions below. Each
question's options are ordered along one axis (most in favour first); each population has a lean (where
on that axis it sits) and a spread, so its distributions differ from question to question but share a
shape that a model can learn and carry to held-out questions: some populations are skewed (one option
holds most of the mass), some spread out. Splits are by question, so evaluation questions are never
trained on. Every response names its option's label verbatim, so ``label_judge`` knows which option a
response expresses.

Files written by ``write_opinions`` (``grouppo data make-opinions``):

* ``{train,eval,test}.jsonl``: GDPO belief records (``grouppo.data.normalize_belief_record``), one per
  (population, question, belief): ``chosen`` expresses the belief, ``rejected`` another option under the
  same belief prefix (as in the GDPO release's GDPO data);
* ``dpo_{train,eval}.jsonl``: the DPO baseline's view, group records with two responses that carry their
  own belief prefix, the more widely held belief preferred;
* ``sft_{train,eval}.jsonl``: prompt/completion records, one per belief (uniform over beliefs, so SFT
  teaches the format, not the distribution);
* ``questions.json``: questions, options, populations and their distributions.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from grouppo.load import write_jsonl
from grouppo.tokenize import DEFAULT_BELIEF_TEMPLATE, belief_prefix

# (topic, question, options ordered from most in favour to least).
QUESTIONS: list[tuple[str, str, list[str]]] = [
    ("public transit", "Should the city spend more on public transit?",
     ["much more", "somewhat more", "the same", "less"]),
    ("a four-day work week", "Would you support a four-day work week?",
     ["strongly support", "lean support", "lean oppose", "strongly oppose"]),
    ("nuclear power", "Should the country build new nuclear power plants?", ["yes", "only if needed", "no"]),
    ("school uniforms", "Should public schools require uniforms?",
     ["require them", "encourage them", "leave it to each school", "ban them"]),
    ("the minimum wage", "What should happen to the minimum wage?",
     ["raise it a lot", "raise it a little", "keep it", "lower it", "abolish it"]),
    ("remote work", "Should employers allow remote work by default?",
     ["always", "most days", "some days", "rarely", "never"]),
    ("voting age", "Should the voting age be lowered to sixteen?", ["yes", "undecided", "no"]),
    ("plastic bags", "Should single-use plastic bags be banned?",
     ["ban them", "tax them", "allow them"]),
    ("national parks", "How much land should be protected as national parks?",
     ["far more", "a bit more", "as much as now", "less"]),
    ("speed limits", "Should speed limits in towns be lowered?",
     ["lower them a lot", "lower them slightly", "keep them", "raise them"]),
    ("a sugar tax", "Should sugary drinks carry an extra tax?",
     ["a high tax", "a small tax", "no tax"]),
    ("space exploration", "How much should the government spend on space exploration?",
     ["much more", "a little more", "the same", "a little less", "much less", "nothing"]),
    ("homework", "How much homework should primary schools give?",
     ["none", "a little", "a moderate amount", "a lot"]),
    ("cash payments", "Should shops be required to accept cash?",
     ["always", "for small amounts", "no requirement"]),
    ("daylight saving time", "What should happen to daylight saving time?",
     ["keep switching", "permanent summer time", "permanent standard time"]),
    ("public libraries", "Should public libraries get more funding?",
     ["much more", "somewhat more", "the same", "less"]),
    ("car-free city centres", "Should city centres be closed to private cars?",
     ["fully car-free", "car-free at weekends", "fewer cars", "no change"]),
    ("compulsory voting", "Should voting be compulsory?", ["yes", "only nationally", "no"]),
    ("animal testing", "Should testing cosmetics on animals be allowed?",
     ["ban it entirely", "allow it with strict rules", "allow it"]),
    ("social media age limits", "Should children under sixteen be kept off social media?",
     ["ban it by law", "parental consent", "age guidance only", "no limits"]),
    ("wind farms", "Should more wind farms be built near towns?",
     ["many more", "a few more", "none near towns"]),
    ("tuition fees", "What should university tuition cost students?",
     ["nothing", "a low fee", "a moderate fee", "the full cost"]),
    ("the retirement age", "What should happen to the retirement age?",
     ["lower it", "keep it", "raise it slowly", "raise it quickly"]),
    ("street lighting", "Should street lights be dimmed at night to save energy?",
     ["dim all of them", "dim some", "keep them bright"]),
    ("organ donation", "Should organ donation be opt-out instead of opt-in?",
     ["opt-out", "ask everyone actively", "keep opt-in"]),
    ("high-speed rail", "Should the country build a high-speed rail line?",
     ["build it now", "build it later", "study it further", "never build it"]),
    ("public broadcasting", "How should public broadcasting be funded?",
     ["more public money", "the same public money", "less public money", "no public money"]),
    ("fireworks", "Should private fireworks be banned?",
     ["ban them", "limit them to holidays", "allow them"]),
    ("rent control", "Should rents be capped by law?",
     ["strict caps", "loose caps", "no caps"]),
    ("meat in school meals", "How often should school meals include meat?",
     ["never", "once a week", "a few times a week", "every day"]),
    ("bicycle lanes", "Should roads give more space to bicycle lanes?",
     ["much more", "a little more", "as now", "less"]),
    ("a universal basic income", "Should every adult receive a basic income?",
     ["yes, generous", "yes, modest", "trial it first", "no"]),
    ("screen time in schools", "Should phones be banned in schools?",
     ["ban them all day", "ban them in class", "let schools decide", "allow them"]),
    ("zoos", "Should zoos keep large wild animals?",
     ["phase it out", "only for conservation", "keep it as it is"]),
    ("tipping", "Should tipping in restaurants be replaced by higher wages?",
     ["replace it", "make it optional", "keep tipping"]),
    ("city trees", "How many trees should the city plant each year?",
     ["many more", "somewhat more", "the same", "fewer"]),
    ("self-driving cars", "Should self-driving cars be allowed on public roads?",
     ["allow them now", "allow them in trials", "wait for years", "never allow them"]),
    ("museum entry", "Should public museums be free to enter?",
     ["free for all", "free for residents", "a low fee", "a full fee"]),
    ("working hours", "Should shops be allowed to open on Sundays?",
     ["all day", "a few hours", "closed"]),
    ("water pricing", "Should households pay more for using more water?",
     ["steeply more", "slightly more", "a flat price"]),
]  # fmt: skip

# (name, lean on the options' axis: 0 = the first option, 1 = the last; spread: small = skewed).
POPULATIONS: list[tuple[str, float, float]] = [
    ("Avalon", 0.1, 0.22),
    ("Brightwater", 0.85, 0.2),
    ("Cedar Plains", 0.4, 0.45),
    ("Dunmore", 0.6, 1.2),
]

PHRASINGS = [
    "My answer is {label}. When it comes to {topic}, that is what I believe.",
    "I would say {label}; on {topic}, that reflects my honest view.",
    "Thinking about {topic}, I land on {label}.",
    "Put simply: {label}. That is where I stand on {topic}.",
]
SPLITS = {"train": 0.6, "eval": 0.2, "test": 0.2}


def distribution(n_options: int, lean: float, spread: float, rng: random.Random) -> list[float]:
    """A population's belief distribution over ``n_options`` ordered options: a softmax of minus the
    squared distance to its ``lean``, over ``spread``, with per-question noise; rounded to 4 decimals
    and summing to 1 exactly (the last entry absorbs the rounding)."""
    question_lean = min(1.0, max(0.0, lean + rng.gauss(0, 0.12)))
    positions = [i / (n_options - 1) for i in range(n_options)]
    logits = [-(((p - question_lean) / spread) ** 2) + rng.gauss(0, 0.3) for p in positions]
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    probs = [round(w / sum(weights), 4) for w in weights]
    probs = [max(p, 0.0001) for p in probs]
    probs[-1] = round(1.0 - sum(probs[:-1]), 6)
    if probs[-1] <= 0:  # the rounding pushed the last one out: take it from the largest
        big = probs.index(max(probs))
        probs[big] = round(probs[big] + probs[-1] - 0.0001, 6)
        probs[-1] = 0.0001
    return probs


def prompt_messages(population: str, question: str, options: list[str]) -> list[dict[str, str]]:
    """The chat prompt: answer as a member of ``population``, naming one of ``options``."""
    text = (
        f"You are a resident of {population}. {question}\nOptions: {'; '.join(options)}.\n"
        "Say which option you hold, then explain briefly."
    )
    return [{"role": "user", "content": text}]


def response(label: str, topic: str, phrasing: int) -> str:
    """A response expressing the option ``label`` (named verbatim) in phrasing number ``phrasing``."""
    return PHRASINGS[phrasing % len(PHRASINGS)].format(label=label, topic=topic)


def make_opinions(seed: int = 0, template: str = DEFAULT_BELIEF_TEMPLATE) -> dict[str, Any]:
    """Everything ``write_opinions`` writes, as lists of records per file name (see the module docstring)."""
    rng = random.Random(f"grouppo-opinions-{seed}")
    order = list(range(len(QUESTIONS)))
    rng.shuffle(order)
    n_train = round(SPLITS["train"] * len(order))
    n_eval = round(SPLITS["eval"] * len(order))
    split_of = {}
    for rank, q in enumerate(order):
        split_of[q] = "train" if rank < n_train else "eval" if rank < n_train + n_eval else "test"
    files: dict[str, list[dict[str, Any]]] = {
        name: [] for name in ("train", "eval", "test", "dpo_train", "dpo_eval", "sft_train", "sft_eval")
    }
    questions = []
    for q, (topic, question, options) in enumerate(QUESTIONS):
        split = split_of[q]
        entry = {"question_id": q, "topic": topic, "question": question, "options": options, "split": split}
        entry["distributions"] = {}
        for population, lean, spread in POPULATIONS:
            probs = distribution(len(options), lean, spread, rng)
            entry["distributions"][population] = probs
            prompt = prompt_messages(population, question, options)
            meta = {"population": population, "question_id": q, "topic": topic}
            k = len(options)
            for b in range(k):
                chosen_phrasing = rng.randrange(len(PHRASINGS))
                other = rng.choice([i for i in range(k) if i != b])
                files[split].append({
                    "prompt": prompt, "beliefs": options, "distribution": probs, "belief": b,
                    "chosen": response(options[b], topic, chosen_phrasing),
                    "rejected": response(options[other], topic, rng.randrange(len(PHRASINGS))),
                    **meta,
                })  # fmt: skip
                if split in ("train", "eval"):
                    files[f"sft_{split}"].append({
                        "prompt": prompt,
                        "completion": [{"role": "assistant", "content": belief_prefix(template, options[b])
                                        + response(options[b], topic, chosen_phrasing)}],
                        **meta,
                    })  # fmt: skip
                    # The DPO baseline: two distinct beliefs, the more widely held one preferred.
                    i, j = rng.sample(range(k), 2)
                    if probs[i] == probs[j]:
                        continue
                    hi, lo = (i, j) if probs[i] > probs[j] else (j, i)
                    pair = [
                        belief_prefix(template, options[b])
                        + response(options[b], topic, rng.randrange(len(PHRASINGS)))
                        for b in (hi, lo)
                    ]
                    files[f"dpo_{split}"].append(
                        {"prompt": prompt, "responses": pair, "labels": [1, 0], **meta}
                    )
        questions.append(entry)
    return {"questions": questions, **files}


def write_opinions(out_dir: str | Path, seed: int = 0, template: str = DEFAULT_BELIEF_TEMPLATE) -> list[Path]:
    """Write the embedded opinion data into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = make_opinions(seed, template)
    paths = []
    for name, records in data.items():
        if name == "questions":
            path = out / "questions.json"
            meta = {"seed": seed, "populations": [p[0] for p in POPULATIONS], "questions": records}
            path.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        else:
            path = out / f"{name}.jsonl"
            write_jsonl(records, path)
        paths.append(path)
    return paths


def label_judge(response_text: str, beliefs: list[str], belief: int) -> bool | None:
    """Does ``response_text`` express ``beliefs[belief]``? True when that label is the only one it names
    (longest labels matched first, so "lean oppose" is not also read as "oppose"); False when it names
    another or none. Works for any data whose responses name their option verbatim."""
    import re

    text = f" {response_text.lower()} "
    found = set()
    for index in sorted(range(len(beliefs)), key=lambda i: -len(beliefs[i])):
        pattern = r"(?<![\w-])" + re.escape(beliefs[index].lower()) + r"(?![\w-])"
        if re.search(pattern, text):
            found.add(index)
            text = re.sub(pattern, " ", text)
    return found == {belief}
