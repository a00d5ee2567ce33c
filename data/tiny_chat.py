"""The embedded world's general (non-reasoning) prompts, and the preference its reward model learns.

R1's last two stages need prompts that no rule can check: stage 3 mixes general chat data into the SFT set, and
stage 4 scores general prompts with a learned reward model. The tiny world's version is small talk addressed to
a person, where the preference is politeness:

    user:      Thank Maya for the map.
    plain:     Thanks, Maya.
    polite:    Thank you so much for the map, Maya!

Every request has a plain and a polite answer. The preference pairs put the polite answer to the right person
above the plain one, above a polite one addressed to someone else, above one that rambles on (the same polite
phrase over and over), above its own letters shuffled, and above an answer to another request: so a reward model
trained on them pays for a polite answer to this request, not for polite-sounding words piled up. Names are
split: TEST_NAMES never appear in anything trained on, so the held-out prompts ask the model (and the reward
model) about people it has never seen.
"""
import re

from data import tiny_task

NAMES = ("Ada Alan Alice Amir Anna Ben Bo Carl Chen Clara Dan Dev Dora Eli Emma Eva Finn Gil Hana Ivan Jack Jade "
         "Jon Kai Kim Lars Lea Leo Lina Luis Maya Max Mia Nia Nils Noor Omar Otto Pia Raj Ravi Rosa Ruth Sam "
         "Sara Tom Uma Vera Wen Yara Yusuf Zoe").split()
TEST_NAMES = ("Abel Bea Cyrus Dina Ezra Fay Gus Ines Jules Kofi Lotte Milo Nora Oskar Ren Sofia Theo Una Vik "
              "Wanda").split()
THINGS = "map book tea cake pen lamp key bike coat cup gift note plant song chair".split()

# (request, plain answers, polite answers); {name} and {thing} are filled in. Few and short on purpose: the tiny
# tokenizer spells English byte by byte, and the 1.7M-parameter model must learn them from a few thousand rows.
INTENTS = (
    ("Greet {name}.", ("Hi {name}.",), ("Hello {name}, so nice to meet you!",)),
    ("Say goodbye to {name}.", ("Bye {name}.",), ("Goodbye {name}, take care!",)),
    ("Thank {name} for the {thing}.", ("Thanks, {name}.",), ("Thank you so much for the {thing}, {name}!",)),
    ("Ask {name} for the {thing}.", ("{name}, give me the {thing}.",), ("{name}, could you please pass me the {thing}?",)),
)


def request(rng, names):
    """A random request: (user text, intent index, name, thing)."""
    i = rng.randrange(len(INTENTS))
    name, thing = rng.choice(names), rng.choice(THINGS)
    return INTENTS[i][0].format(name=name, thing=thing), i, name, thing


def answer(rng, intent, name, thing, polite):
    return rng.choice(INTENTS[intent][2 if polite else 1]).format(name=name, thing=thing)


def sft_row(rng, names, polite_frac):
    """A general chat SFT row: the request, then a plain or (with probability polite_frac) a polite answer."""
    text, i, name, thing = request(rng, names)
    reply = answer(rng, i, name, thing, rng.random() < polite_frac)
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]}


def prompt_row(rng, names):
    """A general RL prompt: nothing a rule reward could check (no answer), so stage 4 hands it to the RM."""
    text = request(rng, names)[0]
    return {"prompt": text, "messages": [{"role": "user", "content": text}]}


REJECTED_KINDS = {"plain": 0.45, "wrong_name": 0.1, "rambling": 0.1, "off_topic": 0.2, "garbled": 0.15}


def preference_row(rng, names):
    """A chosen/rejected pair (train_sft.py --mode=rm): a polite answer to the right person against (REJECTED_KINDS)
    a plain answer; a polite answer to someone else; a polite answer that rambles on; its letters shuffled; or an
    answer to another request altogether (half the time the other request is an arithmetic problem, answered R1-style with <think>).
    The off-topic and garbled negatives are what keep stage 4 honest: without them the policy found that the reward
    model scored its arithmetic habits, and then letter salad, higher than any answer (measured: see the README)."""
    text, i, name, thing = request(rng, names)
    chosen = answer(rng, i, name, thing, True)
    kind = rng.choices(list(REJECTED_KINDS), weights=list(REJECTED_KINDS.values()))[0]
    if kind == "plain":
        rejected = answer(rng, i, name, thing, False)
    elif kind == "wrong_name":
        rejected = answer(rng, i, rng.choice([n for n in names if n != name]), thing, True)
    elif kind == "rambling":
        rejected = " ".join([answer(rng, i, name, thing, True)] * rng.randint(3, 5))
    elif kind == "garbled":  # what a policy writes at high temperature before it can spell: letters at random
        letters = list(answer(rng, i, name, thing, True))
        rng.shuffle(letters)
        rejected = "".join(letters)
    elif rng.random() < 0.5:
        rejected = tiny_task.r1_completion(tiny_task.generate(rng), shortcut=rng.random() < 0.3)
    else:
        other = rng.choice([j for j in range(len(INTENTS)) if j != i])
        rejected = answer(rng, other, name, thing, rng.random() < 0.5)
    return {"prompt": text, "chosen": chosen, "rejected": rejected, "kind": kind}


def parse_request(text):
    """(intent index, name, thing or None) of a request this module wrote, or None."""
    for i, (template, _, _) in enumerate(INTENTS):
        pattern = re.escape(template).replace(re.escape("{name}"), r"(?P<name>\w+)")
        pattern = pattern.replace(re.escape("{thing}"), r"(?P<thing>\w+)")
        m = re.fullmatch(pattern, text)
        if m:
            return i, m["name"], m.groupdict().get("thing")
    return None


def politeness(prompt, text):
    """1.0 when text is exactly the polite answer to this request (right intent, person and thing), else 0.0: a
    readable check of the demonstration's samples, not a reward (stage 4's point is the learned one)."""
    parsed = parse_request(prompt)
    if parsed is None:
        return 0.0
    i, name, thing = parsed
    return float(any(text == t.format(name=name, thing=thing) for t in INTENTS[i][2]))
