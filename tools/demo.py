"""The bundled demo: a seeded grammar of everyday questions and answers, and the script that trains
the tiny demo model on it.

    python -m tools.demo build [--out data/demo] [--steps N] [--minutes N] [--threads N]

writes `prompts.txt` (every question the grammar can ask, one per line) and `model/` (a Llama-style
causal LM of about 1.4 million parameters with its byte-level BPE tokenizer and chat template). All
text comes from the grammar below; nothing is downloaded. The same seed and steps give the same
weights, bit for bit (checked with 1 and 2 threads).

Every answer is built from independent style choices, so that a person has something to prefer and
PPO has something to shift. `answer_style_features` reads them back from any text, generated or not:

- tone: polite (a warm opener such as "Happy to help." and/or a warm closing), curt (a dismissive
  opener such as "Obviously.", a first sentence starting with "Just", a brusque closing), or neutral.
- length: one to three sentences of advice, with an optional intro ("Here is how to ...").
- on topic or rambling: a rambling answer wanders off with one or two digressions about another
  topic, each starting with a marker such as "By the way," or "That reminds me,".
- closing: a last sentence that rounds the answer off, or none.
- hedged or direct: hedged advice starts with "I think you should", "It might help to" or "Perhaps
  you could".
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.errors import RlhfError

# --- The grammar ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topic:
    name: str
    tasks: dict[str, tuple[str, ...]]  # "How do I <task>?" -> advice for it
    general: tuple[str, ...]           # advice that fits any task of the topic
    likes: tuple[str, ...]             # what a digression from another topic can mention

# Advice is an imperative clause: lower-case first word, no final stop.
TOPICS: tuple[Topic, ...] = (
    Topic("cooking", {
        "cook rice": ("rinse the rice before you cook it", "use one cup of rice to two cups of water",
                      "keep the lid on while it cooks"),
        "bake bread": ("measure the flour and water with care", "let the dough rise in a warm place",
                       "bake it until it sounds hollow when you tap it"),
        "boil eggs": ("start the eggs in cold water", "boil them for eight minutes for a firm yolk",
                      "cool them in cold water right away"),
        "make a simple soup": ("start with onions and a little oil", "add the vegetables and cover them with water",
                               "let it simmer for half an hour"),
        "roast vegetables": ("cut everything to the same size so it cooks evenly",
                             "toss the vegetables in oil and salt", "spread them out on a hot tray"),
        "make pancakes": ("mix the batter until it is just smooth", "let the pan get hot before the first pancake",
                          "flip each pancake when bubbles appear"),
    }, ("read the whole recipe before you begin", "taste as you go and add salt at the end"),
        ("fresh bread", "spicy soup", "baking cakes")),
    Topic("weather", {
        "dress for cold weather": ("wear thin layers that you can take off", "keep your hands and head warm",
                                   "choose a coat that stops the wind"),
        "stay cool in a heat wave": ("drink plenty of water", "close the curtains during the day",
                                     "take a cool shower before bed"),
        "prepare for a storm": ("keep a torch and some candles at home", "bring loose things inside",
                                "charge your phone early"),
        "read a weather forecast": ("look at the chance of rain for each hour", "check the wind speed as well",
                                    "compare two forecasts if you can"),
        "keep dry in the rain": ("keep a small umbrella in your bag", "wear shoes that keep water out",
                                 "choose a jacket with a hood"),
        "protect my car from hail": ("park under a roof when hail is coming", "cover the car with thick blankets",
                                     "move the car into a garage if you can"),
    }, ("check the forecast the night before", "stay inside when the wind is strong"),
        ("thunderstorms", "snowy mornings", "the smell of rain")),
    Topic("pets", {
        "train a puppy": ("reward good behavior with a small treat", "keep the training sessions short",
                          "use the same word for each command"),
        "keep a cat happy indoors": ("give your cat a high place to sit", "play with a toy mouse every day",
                                     "put a scratching post near the sofa"),
        "feed a goldfish": ("feed a small pinch of food once a day", "remove any food that sinks",
                            "give only what the fish can eat in a minute"),
        "walk a dog that pulls": ("stop walking when the dog pulls", "reward the dog when the lead is loose",
                                  "use a short lead at first"),
        "trim my dog's nails": ("cut only the tip of each nail", "give a treat after every paw",
                                "do one paw a day if the dog is nervous"),
        "clean a bird cage": ("change the paper at the bottom every day", "wash the bowls with hot water",
                              "scrub the bars once a week"),
    }, ("be calm and patient with the animal", "ask a vet if something seems wrong"),
        ("old dogs", "grumpy cats", "tiny hamsters")),
    Topic("travel", {
        "pack a small suitcase": ("roll your clothes instead of folding them", "pack shoes in the corners",
                                  "bring only three pairs of trousers"),
        "find cheap flights": ("book a few weeks ahead", "fly in the middle of the week",
                               "compare prices from nearby airports"),
        "sleep on a long flight": ("bring a soft pillow and ear plugs", "pick a window seat",
                                   "skip coffee before you board"),
        "plan a weekend trip": ("make a short list of things to see", "book a room close to the center",
                                "leave some free time each day"),
        "avoid jet lag": ("get some sun on the first morning", "stay awake until the local bedtime",
                          "drink water during the flight"),
        "travel with kids": ("pack snacks for the road", "bring a small bag of toys",
                             "plan a stop every two hours"),
    }, ("keep your passport in one safe place", "leave a free day at the end of the trip"),
        ("night trains", "small seaside towns", "road trips")),
    Topic("tools", {
        "use a cordless drill": ("charge the battery fully first", "let the drill do the work and do not push too hard",
                                 "start at a low speed"),
        "hang a heavy shelf": ("find the studs in the wall first", "use long screws and strong brackets",
                               "check that it is level before the last screw"),
        "fix a squeaky door": ("put a drop of oil on the hinge", "open and close the door a few times",
                               "tighten the screws on the hinge"),
        "choose a good hammer": ("pick a hammer that feels good in your hand", "choose a medium weight",
                                 "look for a handle that does not slip"),
        "paint a wall": ("tape the edges before you paint", "use two thin coats instead of one thick coat",
                         "let the first coat dry for a few hours"),
        "store tools in a garage": ("hang the tools on a board so you can see them",
                                    "keep sharp tools out of reach of children", "store them in a dry spot"),
    }, ("wear safety glasses while you work", "measure twice and cut once"),
        ("old wooden toolboxes", "fixing bikes", "building shelves")),
    Topic("plants", {
        "water a cactus": ("water only when the soil is completely dry", "give it a deep drink every two weeks",
                           "water even less in winter"),
        "grow basil indoors": ("put the pot near a bright window", "pick the top leaves often so it grows bushy",
                               "keep the soil a little damp"),
        "repot a houseplant": ("choose a pot one size bigger", "use a pot with a hole in the bottom",
                               "water the plant well after you move it"),
        "keep a fern alive": ("mist the leaves on dry days", "keep it out of direct sun",
                              "keep the soil moist at all times"),
        "start a vegetable garden": ("start with a few easy plants", "pick a spot with lots of sun",
                                     "add a little compost in spring"),
        "get rid of aphids": ("spray the leaves with soapy water", "wipe them off with a damp cloth",
                              "invite ladybirds into the garden"),
    }, ("check the soil with your finger before you water", "turn the pot a little every week"),
        ("tomato plants", "big green ferns", "sunflowers")),
    Topic("sports", {
        "start running": ("start slowly and build up week by week", "mix running with walking at first",
                          "buy a good pair of running shoes"),
        "improve my swimming": ("work on your breathing first", "swim short lengths with rests",
                                "ask a coach to watch your stroke"),
        "warm up before football": ("jog gently for five minutes", "swing your legs to loosen your hips",
                                    "do a few short sprints"),
        "get better at tennis": ("practice your serve every day", "watch the ball all the way to the racket",
                                 "play with someone a bit better than you"),
        "stay motivated at the gym": ("set a small goal for each week", "find a friend to train with",
                                      "write down every workout"),
        "stretch after a workout": ("hold each stretch for half a minute", "breathe slowly while you stretch",
                                    "move slowly into each stretch"),
    }, ("rest one day between hard sessions", "focus on good form before speed"),
        ("football on Sundays", "long swims", "tennis matches")),
    Topic("music", {
        "learn the guitar": ("learn a few simple chords first", "practice for twenty minutes every day",
                             "play songs that you already love"),
        "tune a guitar": ("use a tuner until your ear gets better", "tune each string up to the note",
                          "check the tuning again after a minute"),
        "practice singing": ("warm up your voice with gentle humming", "record yourself and listen back",
                             "stand up straight and breathe from your belly"),
        "read sheet music": ("learn the notes one line at a time", "clap the rhythm before you play it",
                             "read a little music every day"),
        "keep a steady rhythm": ("play along with a metronome", "tap your foot on every beat",
                                 "count out loud while you play"),
        "choose a first instrument": ("pick an instrument that you love to hear", "try a few in a music shop",
                                      "think about how much space you have"),
    }, ("practice a little every day", "play slowly before you play fast"),
        ("old jazz records", "loud drums", "piano music")),
    Topic("cleaning", {
        "clean an oven": ("spread a paste of baking soda and water inside", "let the paste sit overnight",
                          "wipe it off with a damp cloth"),
        "remove a coffee stain": ("dab the stain and do not rub it", "rinse it with cold water from the back",
                                  "wash it as soon as you can"),
        "wash a wool sweater": ("wash wool by hand in cool water", "press the water out gently",
                                "dry it flat on a towel"),
        "keep a bathroom fresh": ("open a window after every shower", "wash the towels twice a week",
                                  "wipe the sink every morning"),
        "clean windows without streaks": ("use warm water with a little vinegar", "clean them on a cloudy day",
                                          "wipe the glass with a dry cloth at the end"),
        "tidy a messy closet": ("take everything out first", "give away clothes you have not worn in a year",
                                "use boxes for small things"),
    }, ("clean a little every day", "start at the top and work down"),
        ("shiny kitchens", "fresh sheets", "spring cleaning")),
    Topic("coffee and tea", {
        "brew good coffee at home": ("grind the beans just before you brew", "use water that is hot but not boiling",
                                     "weigh the coffee and the water"),
        "make iced tea": ("brew the tea twice as strong", "let the tea cool before you add ice",
                          "add lemon and a little honey"),
        "choose coffee beans": ("buy small bags of fresh beans", "check the roast date on the bag",
                                "try a medium roast first"),
        "clean a coffee maker": ("run vinegar and water through the machine", "run clean water through it twice",
                                 "wash the pot with warm soapy water"),
        "steep green tea": ("steep green tea for two minutes", "use water that has cooled a little",
                            "lift the tea bag out gently"),
        "froth milk without a machine": ("shake warm milk in a closed jar", "heat the milk but do not boil it",
                                         "pour it slowly over the coffee"),
    }, ("keep the beans and leaves in a dark and dry place", "use fresh cold water"),
        ("strong coffee", "mint tea", "small cafes")),
    Topic("sleep", {
        "fall asleep faster": ("go to bed at the same time every night", "put your phone away an hour before bed",
                               "read a paper book in bed"),
        "wake up early": ("open the curtains as soon as you wake up", "put the alarm across the room",
                          "go to bed a little earlier each night"),
        "take a good nap": ("nap for twenty minutes at most", "nap before three in the afternoon",
                            "lie down in a dark room"),
        "sleep in a noisy room": ("wear ear plugs", "play soft noise from a fan",
                                  "hang thick curtains over the window"),
        "set up a calm bedroom": ("keep the bedroom cool and dark", "keep work out of the bedroom",
                                  "choose soft and quiet colors"),
        "stop staying up too late": ("set an alarm that tells you to go to bed", "turn the lights down after dinner",
                                     "avoid coffee in the afternoon"),
    }, ("keep the same sleep times on weekends", "get some daylight every morning"),
        ("long naps", "soft pillows", "quiet mornings")),
    Topic("reading", {
        "read more books": ("carry a book with you everywhere", "read a few pages before bed",
                            "stop reading a book you do not enjoy"),
        "choose a good novel": ("ask friends what they loved reading", "read the first page in the shop",
                                "try a short novel first"),
        "start a book club": ("invite four or five friends", "meet once a month and keep it small",
                              "let each person pick a book in turn"),
        "remember what I read": ("write one line about each chapter", "tell a friend about the book",
                                 "read the best parts again"),
        "read with a child": ("let the child pick the book", "use funny voices for the characters",
                              "ask what might happen next"),
        "keep books in good shape": ("keep books out of the sun", "stand them up straight on the shelf",
                                     "use a bookmark instead of folding pages"),
    }, ("set aside a little time to read every day", "visit the local library"),
        ("old mystery novels", "comic books", "the local library")),
    Topic("cycling", {
        "fix a flat bike tire": ("find the hole by putting the tube in water", "put a patch over the hole",
                                 "pump the tire up slowly"),
        "choose a city bike": ("pick a bike with a comfortable seat", "look for mudguards and lights",
                               "test ride it before you buy"),
        "ride safely in traffic": ("wear a helmet and bright clothes", "look over your shoulder before you turn",
                                   "ride where drivers can see you"),
        "clean a bike chain": ("wipe the chain with a rag", "scrub it with a little soapy water",
                               "add a drop of oil to each link"),
        "ride up steep hills": ("shift to an easy gear before the hill", "stay seated and pedal smoothly",
                                "look a little ahead of the wheel"),
        "store a bike for winter": ("keep the bike in a dry place", "clean and oil it first",
                                    "hang it on the wall to save space"),
    }, ("keep the tires pumped up", "carry a pump and a spare tube"),
        ("mountain bikes", "long bike rides", "old racing bikes")),
    Topic("shopping", {
        "save money on groceries": ("make a list and stick to it", "eat something before you go shopping",
                                    "buy store brands"),
        "plan meals for the week": ("pick five dinners on Sunday", "cook a big pot and eat it twice",
                                    "use what is already in the fridge"),
        "compare prices": ("look at the price per kilo", "check the shelves at the bottom",
                           "compare two shops for a month"),
        "avoid impulse buys": ("wait a day before you buy something big", "leave your cards at home",
                               "unsubscribe from shop emails"),
        "shop for fresh fruit": ("buy fruit that is in season", "smell the fruit before you buy it",
                                 "buy only what you can eat in a few days"),
        "buy a good winter coat": ("try the coat on with a thick sweater", "check that it covers your hips",
                                   "buy it at the end of the season"),
    }, ("set a budget before you go", "pay with cash to see what you spend"),
        ("farmers markets", "big sales", "second hand shops")),
)

QUESTION_FRAMES = (
    "How do I {task}?",
    "What is the best way to {task}?",
    "Any tips on how to {task}?",
    "Can you explain how to {task}?",
    "I want to {task}. Where should I start?",
)

INTROS = ("Here is how to {task}.", "To {task}, you need a little patience.")  # echo the question
POLITE_OPENERS = ("Good question!", "Thanks for asking.", "Happy to help.", "Great question, thank you!",
                  "Sure, I would be glad to help.")
CURT_OPENERS = ("Obviously.", "Easy.", "Come on, this is basic.", "Fine.", "Everyone knows this.")
CURT_LEAD = "Just"  # the curt way to start the first piece of advice
POLITE_CLOSINGS = ("I hope this helps!", "Good luck, and have fun!", "Feel free to ask if you need more help.",
                   "Enjoy, and take care!")
CURT_CLOSINGS = ("That's it.", "Figure out the rest yourself.", "Nothing more to say.", "Now stop asking.")
NEUTRAL_CLOSINGS = ("That should do it.", "That is the main thing.", "It gets easier with practice.")
HEDGES = ("I think you should", "It might help to", "Perhaps you could")
DIGRESSIONS = (  # each starts with a marker from DIGRESSION_MARKERS
    "By the way, my {relative} once tried to {other_task} and it went badly.",
    "That reminds me, I still need to {other_task} this week.",
    "Speaking of which, my {relative} loves {other_likes}.",
    "On a different note, {other_advice}.",
    "Funny story, I once spent a whole day trying to {other_task}.",
)
DIGRESSION_MARKERS = ("By the way,", "That reminds me,", "Speaking of which,", "On a different note,",
                      "Funny story,")
RELATIVES = ("uncle", "aunt", "neighbor", "cousin", "friend", "sister", "brother", "grandmother")

TONES = ("polite", "neutral", "curt")
TONE_WEIGHTS = (0.35, 0.3, 0.35)
ADVICE_COUNT_WEIGHTS = (0.4, 0.4, 0.2)  # one to three sentences of advice
INTRO_P = 0.25
RAMBLE_P = 0.35
HEDGE_P = 0.3
CLOSING_P = 0.5


def _questions() -> list[tuple[Topic, str, str]]:
    return [(topic, task, frame.format(task=task))
            for topic in TOPICS for task in topic.tasks for frame in QUESTION_FRAMES]


def demo_prompts() -> list[str]:
    """Every question the grammar asks, in a fixed order: the demo prompt set."""
    return [question for _, _, question in _questions()]


def _sentence(clause: str) -> str:
    return clause[0].upper() + clause[1:] + "."


def _second_person(task: str) -> str:
    """The asker's "trim my dog's nails" as the answerer says it: "trim your dog's nails"."""
    return " ".join({"my": "your", "I": "you"}.get(word, word) for word in task.split())


def generate_answer(topic: Topic, task: str, rng: random.Random) -> str:
    """One answer to a question about `task`, with every style dimension drawn at random."""
    tone = rng.choices(TONES, TONE_WEIGHTS)[0]
    n_advice = rng.choices(range(1, len(ADVICE_COUNT_WEIGHTS) + 1), ADVICE_COUNT_WEIGHTS)[0]
    clauses = rng.sample(topic.tasks[task] + topic.general, n_advice)
    hedge = rng.random() < HEDGE_P
    advice = [f"{rng.choice(HEDGES)} {c}." if hedge and (i == 0 or rng.random() < 0.6) else _sentence(c)
              for i, c in enumerate(clauses)]

    opener = closing = None
    if tone == "polite":
        opener = rng.choice(POLITE_OPENERS) if rng.random() < 0.8 else None
        if opener is None or rng.random() < CLOSING_P:
            closing = rng.choice(POLITE_CLOSINGS)
    elif tone == "curt":
        opener = rng.choice(CURT_OPENERS) if rng.random() < 0.6 else None
        if not hedge and (opener is None or rng.random() < 0.5):
            advice[0] = f"{CURT_LEAD} {clauses[0]}."
        if (opener is None and not advice[0].startswith(CURT_LEAD)) or rng.random() < 0.4:
            closing = rng.choice(CURT_CLOSINGS)
    elif rng.random() < CLOSING_P:
        closing = rng.choice(NEUTRAL_CLOSINGS)

    if rng.random() < RAMBLE_P:
        for _ in range(1 if rng.random() < 0.8 else 2):
            advice.insert(rng.randint(1, len(advice)), _digression(topic, rng))
    intro = rng.choice(INTROS).format(task=_second_person(task)) if rng.random() < INTRO_P else None

    return " ".join(s for s in (opener, intro, *advice, closing) if s)


def _digression(topic: Topic, rng: random.Random) -> str:
    other = rng.choice([t for t in TOPICS if t is not topic])
    other_task = rng.choice(list(other.tasks))
    return rng.choice(DIGRESSIONS).format(
        relative=rng.choice(RELATIVES), other_task=other_task, other_likes=rng.choice(other.likes),
        other_advice=rng.choice(other.tasks[other_task] + other.general))


def generate_corpus(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` (question, answer) exchanges; the same seed gives the same list."""
    rng = random.Random(seed)
    questions = _questions()
    exchanges = []
    for _ in range(n):
        topic, task, question = rng.choice(questions)
        exchanges.append((question, generate_answer(topic, task, rng)))
    return exchanges


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@functools.cache
def grammar_sentences() -> frozenset[str]:
    """Every sentence the grammar can produce: an answer made only of these is well formed."""
    sentences = {*POLITE_OPENERS, *CURT_OPENERS, *POLITE_CLOSINGS, *CURT_CLOSINGS, *NEUTRAL_CLOSINGS}
    for topic in TOPICS:
        for task, advice in topic.tasks.items():
            sentences |= {intro.format(task=_second_person(task)) for intro in INTROS}
            for clause in advice + topic.general:
                sentences |= {_sentence(clause), f"{CURT_LEAD} {clause}."} | {f"{h} {clause}." for h in HEDGES}
            for digression in DIGRESSIONS:
                sentences |= {digression.format(relative=relative, other_task=task, other_likes=likes,
                                                other_advice=clause)
                              for relative in RELATIVES for likes in topic.likes for clause in advice + topic.general}
    return frozenset(sentences)


def answer_style_features(text: str) -> dict[str, Any]:
    """Answer style features: the style dimensions of the demo grammar, read back from an answer.

    is_polite / is_curt: a polite or a curt marker is present (a sampled answer may show both);
    on_topic: no digression marker; has_closing: the last sentence is a closing; is_hedged: some
    advice is hedged; well_formed: every sentence is one the grammar can produce; sentences and
    length (words) measure length.
    """
    text = text.strip()
    sentences = [s for s in _SENTENCE_END.split(text) if s]
    last = sentences[-1] if sentences else ""
    return {
        "is_polite": any(m in text for m in POLITE_OPENERS + POLITE_CLOSINGS),
        "is_curt": any(m in text for m in CURT_OPENERS + CURT_CLOSINGS)
                   or any(s.startswith(CURT_LEAD + " ") for s in sentences),
        "on_topic": not any(m in text for m in DIGRESSION_MARKERS),
        "has_closing": last in POLITE_CLOSINGS + CURT_CLOSINGS + NEUTRAL_CLOSINGS,
        "is_hedged": any(s.startswith(h) for s in sentences for h in HEDGES),
        "well_formed": bool(sentences) and all(s in grammar_sentences() for s in sentences),
        "sentences": len(sentences),
        "length": len(text.split()),
    }


# --- The demo model ---------------------------------------------------------------------------------

# Like tools.tiny's template, plus EOS after each assistant turn: a rendered conversation is exactly
# what the model was trained on, and a sampled answer ends with EOS.
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 60
    vocab_size: int = 2000
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    seed: int = 0


def encode_exchanges(tokenizer: Any, exchanges: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """Token ids of each exchange, and how many of them are the prompt (not trained on).

    The prompt is encoded exactly as sampling encodes it (rlhf.models.encode_prompt), and the answer
    as the continuation of the template's "assistant:" followed by EOS.
    """
    from rlhf.models import encode_prompt, format_prompt

    prompt_ids = {q: encode_prompt(tokenizer, format_prompt(tokenizer, q)) for q in {q for q, _ in exchanges}}
    answer_ids = tokenizer([" " + a for _, a in exchanges], add_special_tokens=False)["input_ids"]
    return [(prompt_ids[q] + ids + [tokenizer.eos_token_id], len(prompt_ids[q]))
            for (q, _), ids in zip(exchanges, answer_ids)]


def answer_token_loss(logits: Any, labels: Any, normalizer: float) -> Any:
    """Answer token loss: next-token cross-entropy summed over labelled tokens, divided by a fixed normalizer.

    A fixed normalizer (the corpus's mean labelled tokens per batch) makes every token weigh the same
    in every batch; a per-batch mean would favour the tokens of short batches, and length-grouped
    batches would then teach the model to stop early.
    """
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum") / normalizer


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Warmup-cosine learning rate: linear warmup to lr, then cosine decay to lr / 10 at the last step."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def build_demo(out_dir: Path, settings: TrainSettings = TrainSettings(), minutes: float | None = None,
               threads: int | None = None, log: Any = print) -> dict[str, Any]:
    """Write `out_dir`/prompts.txt and train `out_dir`/model (weights + tokenizer). Returns a summary."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tools.tiny import train_byte_level_tokenizer

    started, cpu_started = time.monotonic(), time.process_time()
    if threads is not None:  # 1 and 2 threads were checked to give bit-identical weights
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(settings.seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "prompts.txt").write_text("\n".join(demo_prompts()) + "\n", encoding="utf-8")

    corpus = generate_corpus(settings.steps * settings.batch_size, seed=settings.seed)
    tokenizer = train_byte_level_tokenizer(
        (f"user: {q}\nassistant: {a}\n" for q, a in corpus), settings.vocab_size)
    tokenizer.chat_template = DEMO_CHAT_TEMPLATE
    examples = encode_exchanges(tokenizer, corpus)
    batches = length_grouped_batches(examples, settings.batch_size, settings.seed)
    tokens_per_batch = sum(len(ids) - prompt_len for ids, prompt_len in examples) / len(batches)

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=settings.hidden_size, num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads, num_key_value_heads=settings.num_heads,
        intermediate_size=settings.intermediate_size, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    log(f"{len(corpus)} exchanges, vocab {len(tokenizer)}, {params / 1e6:.2f}M parameters")

    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    steps_done, loss = 0, float("nan")
    for step in range(settings.steps):
        if minutes is not None and time.monotonic() - started > minutes * 60:
            log(f"stopped at step {step} after {minutes} min: this model is not the reproducible one")
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        input_ids, attention_mask, labels = _batch(batches[step], tokenizer.pad_token_id)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        batch_loss = answer_token_loss(logits, labels, tokens_per_batch)
        optimizer.zero_grad(set_to_none=True)
        batch_loss.backward()
        loss = batch_loss.item() * tokens_per_batch / int((labels[:, 1:] != -100).sum())  # per token
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        steps_done = step + 1
        if step % 50 == 0 or step == settings.steps - 1:
            log(f"step {step:5d}  loss {loss:.3f}  {time.monotonic() - started:5.0f}s")

    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model_dir = out_dir / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    size = sum(f.stat().st_size for f in model_dir.iterdir())
    return {"parameters": params, "vocab": len(tokenizer), "steps": steps_done, "final_loss": round(loss, 4),
            "seconds": round(time.monotonic() - started, 1), "cpu_seconds": round(time.process_time() - cpu_started, 1),
            "model_bytes": size}


def length_grouped_batches(examples: list[tuple[list[int], int]], batch_size: int, seed: int,
                           group: int = 64) -> list[list[tuple[list[int], int]]]:
    """Batches of examples of similar length (less padding to compute), in a seeded random order.

    Each run of `group` batches' worth of examples is sorted by length and cut into batches.
    """
    chunk = batch_size * group
    batches = []
    for start in range(0, len(examples), chunk):
        ordered = sorted(examples[start:start + chunk], key=lambda example: len(example[0]))
        batches += [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    random.Random(seed).shuffle(batches)
    return batches


def _batch(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[Any, Any, Any]:
    """Right-padded ids, attention mask and labels (-100 on the prompt and the padding)."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100)
    for row, (ids, prompt_len) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        labels[row, prompt_len:len(ids)] = torch.tensor(ids[prompt_len:])
    return input_ids, attention_mask, labels


def main(argv: list[str] | None = None) -> int:
    from rlhf.paths import demo_model_dir

    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write the demo prompts and train the demo model")
    build.add_argument("--out", type=Path, default=demo_model_dir().parent, help="output folder (default: data/demo)")
    build.add_argument("--steps", type=int, default=TrainSettings.steps, help="training steps")
    build.add_argument("--minutes", type=float, default=None,
                       help="stop training after this many minutes (for quick trials; not reproducible)")
    build.add_argument("--threads", type=int, default=None,
                       help="CPU threads for torch (default: torch's choice; 1 is faster on a busy machine)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise RlhfError(f"--steps must be >= 1, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        raise RlhfError(f"--threads must be >= 1, got {args.threads}")
    summary = build_demo(args.out, TrainSettings(steps=args.steps), minutes=args.minutes, threads=args.threads)
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RlhfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
