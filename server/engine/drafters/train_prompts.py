"""More training instructions for the draft head, built from templates (none is a Spec-Bench question).

The head learns what the target model says, so what matters is that the instructions cover the
kinds of answer it will be asked for (Spec-Bench's six tasks and chat in general): explanations,
stories, advice, role play, arithmetic word problems, translation into English, summaries and
questions about a given passage. The hand-written set (`assets/train_prompts.jsonl`, 226
instructions) is widened here by crossing task templates with topics, by word problems with
seeded random numbers, by sentences written in German, French and Spanish for the translation
templates, and by passages of the Python documentation that ships with the interpreter
(`pydoc_data.topics`) for summaries and passage questions. `generated_prompts(seed)` is
deterministic, so `via-sd train-head` reproduces the same set.
"""

from __future__ import annotations

import random
import re

TOPICS = [
    "photosynthesis", "black holes", "the water cycle", "volcanoes", "earthquakes", "the immune system",
    "vaccines", "climate change", "renewable energy", "solar panels", "wind turbines", "electric cars",
    "the internet", "blockchain", "machine learning", "neural networks", "quantum computing", "cloud computing",
    "cybersecurity", "password managers", "open source software", "smartphones", "social media", "video games",
    "the Roman Empire", "ancient Egypt", "the Renaissance", "the printing press", "the Industrial Revolution",
    "World War I", "the Cold War", "the moon landing", "the Silk Road", "the Great Wall of China",
    "democracy", "inflation", "interest rates", "the stock market", "supply and demand", "budgeting",
    "remote work", "time management", "public speaking", "learning a new language", "meditation", "sleep",
    "healthy eating", "running a marathon", "yoga", "gardening", "composting", "beekeeping", "coffee",
    "chocolate", "bread baking", "Italian cooking", "Japanese tea ceremonies", "jazz", "classical music",
    "the violin", "photography", "oil painting", "poetry", "Shakespeare", "science fiction", "chess",
    "football", "the Olympic Games", "mountain climbing", "ocean currents", "coral reefs", "rainforests",
    "deserts", "penguins", "elephants", "honeybees", "dolphins", "wolves", "dinosaurs", "evolution", "DNA",
    "the human heart", "the brain", "antibiotics", "recycling", "plastic pollution", "urban planning",
    "public transport", "bicycles", "airplanes", "trains", "the metric system", "prime numbers",
    "probability", "statistics", "geometry", "calculus", "the Pythagorean theorem", "gravity",
    "magnetism", "electricity", "light", "sound", "the periodic table", "chemical reactions",
    "the solar system", "Mars", "comets", "the seasons", "weather forecasting", "maps", "libraries",
    "museums", "friendship", "kindness", "job interviews", "writing a resume", "starting a small business",
    "marketing", "customer service", "negotiation", "teamwork", "leadership", "parenting", "pets",
    "moving to a new city", "traveling on a budget", "camping", "packing for a trip", "hotels",
    "birthday parties", "weddings", "holidays", "the history of tea", "the history of money",
    "databases", "operating systems", "compilers", "sorting algorithms", "recursion", "version control",
    "unit testing", "web browsers", "email", "spreadsheets", "robots", "3D printing", "drones",
]

TEMPLATES = [
    ("stem", "Explain {t} in simple terms."),
    ("stem", "What are the most important facts about {t}?"),
    ("humanities", "Why is {t} important? Give three reasons."),
    ("writing", "Write a short story that involves {t}."),
    ("writing", "Write a short poem about {t}."),
    ("writing", "Write a blog post introduction about {t}."),
    ("writing", "Write a persuasive paragraph arguing that everyone should learn about {t}."),
    ("advice", "Give me five practical tips related to {t}."),
    ("advice", "I am a beginner. How should I get started with {t}?"),
    ("chat", "Tell me something surprising about {t}."),
    ("chat", "What is your opinion on {t}?"),
    ("roleplay", "Pretend you are a teacher. Give a short lesson on {t} to a class of ten-year-olds."),
    ("roleplay", "You are a tour guide. Describe {t} to a group of visitors."),
    ("reasoning", "What are the advantages and disadvantages of {t}?"),
    ("reasoning", "Compare {t} with {u}. How are they similar and how are they different?"),
    ("qa", "Answer briefly: what is {t}?"),
    ("qa", "Who should care about {t}, and why?"),
    ("extraction", "List the key terms someone must know to understand {t}, with one-line definitions."),
    ("coding", "Write a Python function related to {t} and explain how it works."),
    ("summarization", "Summarize what is generally known about {t} in three sentences."),
]

FOREIGN = [
    "Der Zug nach Berlin hat heute wegen eines technischen Problems eine Stunde Verspätung.",
    "Die Regierung hat angekündigt, die Steuern für kleine Unternehmen im nächsten Jahr zu senken.",
    "Meine Großmutter backt jeden Sonntag einen Apfelkuchen für die ganze Familie.",
    "Die Forscher haben eine neue Art von Frosch im Regenwald entdeckt.",
    "Das Museum bleibt wegen Renovierungsarbeiten bis Ende des Monats geschlossen.",
    "Viele Menschen arbeiten seit der Pandemie lieber von zu Hause aus.",
    "Der Bürgermeister eröffnete gestern die neue Brücke über den Fluss.",
    "Im Sommer ist es in dieser Stadt oft sehr heiß und trocken.",
    "Die Mannschaft gewann das Spiel in den letzten Minuten mit einem spektakulären Tor.",
    "Wir sollten mehr Bäume pflanzen, um die Luftqualität in den Städten zu verbessern.",
    "Der Preis für Strom ist in den letzten zwei Jahren deutlich gestiegen.",
    "Die Schüler müssen ihre Hausaufgaben bis Freitag abgeben.",
    "Nach dem langen Winter freuen sich alle auf den Frühling.",
    "Die Firma plant, im nächsten Jahr zweihundert neue Mitarbeiter einzustellen.",
    "Das Konzert wurde wegen des schlechten Wetters abgesagt.",
    "Le gouvernement a présenté hier un nouveau plan pour réduire la pollution de l'air.",
    "Ma sœur apprend à jouer du piano depuis trois ans.",
    "Le marché du samedi matin attire beaucoup de touristes.",
    "Les scientifiques étudient l'effet du réchauffement climatique sur les glaciers.",
    "Le restaurant au coin de la rue sert les meilleures crêpes de la ville.",
    "La bibliothèque municipale propose des cours d'informatique gratuits.",
    "Il a plu toute la journée, alors nous sommes restés à la maison.",
    "L'entreprise a annoncé des bénéfices records pour le dernier trimestre.",
    "El tren llegó tarde porque había nieve en las vías.",
    "Mi hermano trabaja como enfermero en un hospital de Madrid.",
    "La ciudad construirá un nuevo parque cerca del río el próximo año.",
    "Los estudiantes organizaron una campaña para reciclar más papel.",
    "El médico me recomendó caminar treinta minutos cada día.",
    "La exposición de arte moderno estará abierta hasta el domingo.",
    "Nuestro equipo ganó el campeonato después de una temporada difícil.",
]

TRANSLATE = [
    "Translate the following sentence into English: {s}",
    "Translate to English: {s}",
    "What does this sentence mean in English? \"{s}\"",
]

PASSAGE = [
    ("summarization", "Summarize the following text in a few sentences:\n\n{p}"),
    ("summarization", "Write a one-paragraph summary of this passage:\n\n{p}"),
    ("extraction", "Read the passage and list its main points:\n\n{p}"),
    ("qa", "Read the passage below and explain what it describes.\n\n{p}"),
    ("qa", "{p}\n\nBased on the passage above, what is the most important thing a programmer should remember?"),
]

NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kofi", "Lena", "Maya", "Noah"]
ITEMS = ["apples", "pencils", "books", "stickers", "cookies", "marbles", "cards", "eggs", "shirts", "tickets"]


def _word_problem(rng: random.Random) -> str:
    n, m = rng.sample(NAMES, 2)
    it = rng.choice(ITEMS)
    a, b, c = rng.randint(3, 60), rng.randint(2, 12), rng.randint(2, 9)
    price = rng.randint(2, 25)
    forms = [
        f"{n} has {a} {it}. {m} gives {n} {b} more, and then {n} gives away {c}. How many {it} does {n} have now?",
        f"{n} buys {b} packs of {it}. Each pack has {c} {it} and costs ${price}. How many {it} does {n} have, and how much did they cost?",
        f"A store sells {it} for ${price} each. {n} buys {b} and pays with a ${price * b + rng.randint(1, 20)} bill. How much change does {n} get?",
        f"{n} reads {b} pages every day. How many days does it take to read a book of {b * a} pages?",
        f"A train travels at {a + 20} km per hour for {c} hours. How far does it travel?",
        f"{n} earns ${a + 10} per hour and works {c} hours a day for {b} days. How much does {n} earn in total?",
        f"There are {a + b} students in a class. {b} are absent today. If the rest are split into groups of {c}, how many full groups are there?",
        f"{n} and {m} share {a * 2} {it} so that {n} gets {c} more than {m}. How many does each get?",
    ]
    return rng.choice(forms) + rng.choice(["", " Show your work.", " Explain step by step.", " Think step by step and give the final answer."])


def _passages(rng: random.Random, n: int) -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a trimmed interpreter
        return []
    paras = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(para.split())
            words = len(text.split())
            if 60 <= words <= 220 and text[0].isupper() and "***" not in text and ">>>" not in text:
                paras.append(text)
    rng.shuffle(paras)
    return paras[:n]


def generated_prompts(seed: int = 0, start_id: int = 10_000) -> list[dict]:
    """About 1,500 instructions, deterministic in `seed`; ids from `start_id` on."""
    rng = random.Random(seed)
    rows: list[tuple[str, str]] = []
    for t in TOPICS:
        for cat, tpl in rng.sample(TEMPLATES, 6):
            rows.append((cat, tpl.format(t=t, u=rng.choice([x for x in TOPICS if x != t]))))
    for s in FOREIGN:
        for tpl in TRANSLATE:
            rows.append(("translation", tpl.format(s=s)))
    for _ in range(180):
        rows.append(("math", _word_problem(rng)))
    for p in _passages(rng, 160):
        cat, tpl = rng.choice(PASSAGE)
        rows.append((cat, tpl.format(p=p)))
    rng.shuffle(rows)
    return [{"id": start_id + i, "category": cat, "prompt": text} for i, (cat, text) in enumerate(rows)]
