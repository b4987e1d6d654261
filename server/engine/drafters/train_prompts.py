"""More training instructions for the draft head, built from templates (none is a Spec-Bench question).

The head learns what the target model says, so what matters is that the instructions cover the
kinds of answer it will be asked for (Spec-Bench's six tasks and chat in general): explanations,
stories, advice, role play, arithmetic word problems, translation into English, summaries and
questions about a given passage. The hand-written set (`assets/train_prompts.jsonl`, 226
instructions) is widened here by crossing task templates with topics, by word problems with
seeded random numbers, by sentences written in German, French and Spanish for the translation
templates, and by passages of the Python documentation that ships with the interpreter
(`pydoc_data.topics`) for summaries and passage questions. `generated_prompts(seed)` is
deterministic, so `via-sd train-head` reproduces the same set. `more_prompts(seed)` is the
second templated set, and `paper_prompts(seed)` an opt-in third one: passages of research papers
from the PyPI package `aclsum`, of the length of Spec-Bench's summaries and retrieval questions.
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


# ---------------------------------------------------------------------------- the second set
# Instructions, not samples, are what the head lacks (more sampled answers of the same instructions
# bought ~1.6 points of Spec-Bench top-1 per doubling, more instructions ~5), so a second set with
# other topics, MT-Bench-like phrasings, German news sentences (Spec-Bench's translation task is
# German to English), short factual questions and other word problems. Its ids start at 20,000 so
# that the first set's cached answers stay valid.

TOPICS_2 = [
    "the French Revolution", "the American Civil War", "the Byzantine Empire", "the Aztecs", "the Vikings",
    "the Ottoman Empire", "the Apollo program", "the fall of the Berlin Wall", "the European Union",
    "the United Nations", "human rights", "free trade", "taxes", "the minimum wage", "unemployment",
    "housing prices", "cryptocurrency", "credit cards", "insurance", "retirement savings", "mortgages",
    "electric grids", "nuclear power", "hydrogen fuel", "batteries", "semiconductors", "satellites", "GPS",
    "space telescopes", "exoplanets", "the Big Bang", "dark matter", "tides", "hurricanes", "tornadoes",
    "glaciers", "soil erosion", "wetlands", "bird migration", "octopuses", "sharks", "ants", "mushrooms",
    "trees", "the nitrogen cycle", "vitamins", "allergies", "diabetes", "blood pressure", "the common cold",
    "mental health", "stress", "exercise", "posture", "first aid", "hand washing", "nutrition labels",
    "vegetarian diets", "fermentation", "cheese making", "spices", "rice", "pizza", "street food", "opera",
    "hip hop", "film editing", "animation", "comic books", "board games", "knitting", "woodworking",
    "architecture", "skyscrapers", "bridges", "shipping ports", "supply chains", "online shopping",
    "advertising", "product design", "customer reviews", "data privacy", "phishing", "the ethics of AI",
    "self-driving cars", "virtual reality", "smart homes", "fitness trackers", "search engines",
    "programming languages", "APIs", "linked lists", "hash tables", "binary search", "regular expressions",
    "the command line", "debugging", "code reviews", "software documentation", "agile development",
    "volunteering", "elections", "local newspapers", "journalism", "online learning", "exams",
    "scholarships", "student loans", "internships", "burnout", "the four-day work week", "commuting",
    "tourism", "national parks", "music festivals", "the Tour de France", "tennis", "basketball", "swimming",
]

TEMPLATES_2 = [
    ("writing", "Draft a professional email to a colleague about {t}."),
    ("writing", "Write a short news report about a recent development in {t}."),
    ("writing", "Write a short dialogue between two friends who disagree about {t}."),
    ("writing", "Describe {t} to someone who has never heard of it, using vivid language."),
    ("stem", "How does {t} work? Explain the main ideas step by step."),
    ("stem", "What are common misconceptions about {t}, and what is the truth?"),
    ("humanities", "How has {t} changed over the last hundred years?"),
    ("humanities", "What role does {t} play in society today?"),
    ("reasoning", "What would happen if {t} suddenly disappeared? Think it through."),
    ("reasoning", "Give one argument for and one argument against spending more public money on {t}."),
    ("qa", "In one or two sentences, what should everyone know about {t}?"),
    ("extraction", "Make a table with three columns (term, meaning, example) for ideas related to {t}."),
    ("coding", "Write a short Python script that could help someone who works with {t}. Add comments."),
    ("summarization", "Give a brief overview of {t} for the science page of a newspaper."),
    ("roleplay", "Act as an expert on {t} and answer a curious student who asks why it matters."),
    ("advice", "What mistakes do people often make with {t}, and how can they avoid them?"),
    ("chat", "Recommend three ways to learn more about {t} and explain each choice."),
    ("math", "Make up a simple math word problem about {t} and solve it."),
]

PLACES = [
    "Kyoto", "Lisbon", "Iceland", "Peru", "Morocco", "Vietnam", "New Zealand", "Prague", "Istanbul",
    "Cape Town", "Vancouver", "Mexico City", "Edinburgh", "Bali", "Norway", "Crete", "Buenos Aires", "Seoul",
    "Tanzania", "the Scottish Highlands",
]
PLACE_TEMPLATES = [
    ("writing", "Compose a travel blog post about a week in {p}, with tips for first-time visitors."),
    ("advice", "Plan a three-day itinerary for a trip to {p}."),
    ("humanities", "What should a tourist know about the food and customs of {p}?"),
]

PERSONAS = [
    "a pirate captain", "Sherlock Holmes", "a medieval knight", "a friendly robot", "a famous chef",
    "a football coach", "a wise old wizard", "a startup founder", "an astronaut on a space station",
    "a customer support agent", "a museum curator", "a marine biologist", "a stand-up comedian",
    "a strict librarian", "a time traveller from the year 2300",
]
PERSONA_QUESTIONS = [
    "How do you spend a typical day?", "What advice would you give a young person?",
    "Describe the biggest challenge you have faced.", "What do you think about smartphones?",
    "Tell me about your favourite memory.",
]

GERMAN = [
    "Die Zentralbank hat den Leitzins überraschend um einen halben Prozentpunkt angehoben.",
    "Nach tagelangen Regenfällen sind in mehreren Dörfern die Keller überflutet.",
    "Der Autobauer will bis 2030 nur noch Elektrofahrzeuge in Europa verkaufen.",
    "Die Polizei sucht nach Zeugen, die den Unfall am Montagabend beobachtet haben.",
    "Bei der Wahl am Sonntag lag die Wahlbeteiligung bei knapp siebzig Prozent.",
    "Die Preise für Lebensmittel sind im vergangenen Monat erneut gestiegen.",
    "Der Trainer zeigte sich nach der Niederlage enttäuscht, aber kämpferisch.",
    "Forscher haben in der Antarktis einen bisher unbekannten See unter dem Eis entdeckt.",
    "Die Stadt will den Radverkehr mit neuen Wegen und mehr Abstellplätzen fördern.",
    "Das Unternehmen meldete für das dritte Quartal einen Umsatzrückgang von fünf Prozent.",
    "Der Flughafen musste wegen eines Sturms am Nachmittag vorübergehend geschlossen werden.",
    "Viele Eltern klagen über fehlende Plätze in den Kindergärten.",
    "Die Ministerin kündigte an, das Gesetz noch vor der Sommerpause zu verabschieden.",
    "Im Finale setzte sich die Spielerin in drei Sätzen gegen die Titelverteidigerin durch.",
    "Die Mieten in den großen Städten steigen schneller als die Einkommen.",
    "Der Streik der Lokführer legt heute große Teile des Bahnverkehrs lahm.",
    "Ein Großbrand in einer Lagerhalle hat einen Schaden in Millionenhöhe verursacht.",
    "Die Zahl der Touristen hat in diesem Sommer einen neuen Rekord erreicht.",
    "Ärzte warnen vor einer starken Grippewelle in den kommenden Wochen.",
    "Der Konzern plant, in den nächsten drei Jahren rund tausend Stellen abzubauen.",
    "Die Verhandlungen über ein neues Handelsabkommen sind vorerst gescheitert.",
    "Am Wochenende werden in den Bergen bis zu dreißig Zentimeter Neuschnee erwartet.",
    "Die Schule erhält neue Computer und einen schnelleren Internetanschluss.",
    "Der Angeklagte bestreitet alle Vorwürfe und will in Berufung gehen.",
    "Nach der Renovierung ist das Theater endlich wieder für Besucher geöffnet.",
    "Immer mehr Menschen kaufen ihre Kleidung im Internet statt im Geschäft.",
    "Die Regierung will den Ausbau der Windkraft an Land deutlich beschleunigen.",
    "Der Verein hat einen neuen Stürmer aus der spanischen Liga verpflichtet.",
    "Die Ausstellung zeigt Gemälde, die seit über hundert Jahren nicht zu sehen waren.",
    "Wegen Bauarbeiten bleibt die Autobahn bis Freitag in beide Richtungen gesperrt.",
    "Das Parlament debattierte stundenlang über den Haushalt für das kommende Jahr.",
    "Die Exporte nach China sind im ersten Halbjahr deutlich zurückgegangen.",
    "Ein Sprecher des Ministeriums wollte sich zu den Berichten nicht äußern.",
    "Die Feuerwehr konnte die Bewohner rechtzeitig aus dem brennenden Haus retten.",
    "Der Bürgermeister versprach, die Probleme mit dem Nahverkehr schnell zu lösen.",
    "Die Studie zeigt, dass Kinder heute weniger Zeit im Freien verbringen als früher.",
    "Die Opposition fordert eine unabhängige Untersuchung des Skandals.",
    "Der Sänger sagte seine Tournee aus gesundheitlichen Gründen ab.",
    "In der Innenstadt sollen bald keine Autos mit Verbrennungsmotor mehr fahren dürfen.",
    "Die Bank rechnet im nächsten Jahr mit einem schwachen Wirtschaftswachstum.",
    "Der Zoo freut sich über die Geburt von zwei kleinen Eisbären.",
    "Die Arbeitslosigkeit ist im Oktober leicht gesunken.",
    "Viele Landwirte leiden unter der anhaltenden Trockenheit.",
    "Das neue Krankenhaus soll im Frühjahr seinen Betrieb aufnehmen.",
    "Die Gewerkschaft verlangt acht Prozent mehr Lohn für die Beschäftigten.",
    "Der Präsident traf sich mit seinem französischen Amtskollegen in Paris.",
    "Die Sonde hat erste Bilder von der Oberfläche des Kometen zur Erde geschickt.",
    "Die Universität bietet ab dem Winter einen neuen Studiengang für Datenwissenschaft an.",
    "Bei dem Erdbeben wurden zahlreiche Gebäude beschädigt, verletzt wurde jedoch niemand.",
    "Die Bahn will die Pünktlichkeit ihrer Fernzüge in den nächsten Jahren verbessern.",
    "Der Fußballverband hat eine Geldstrafe gegen den Verein verhängt.",
    "Die Menschen in der Region fürchten um ihre Arbeitsplätze.",
    "Der Film gewann beim Festival den Preis für das beste Drehbuch.",
    "Die Behörden raten, bei der Hitze viel zu trinken und die Mittagssonne zu meiden.",
    "Ein Drittel der Befragten gab an, mit ihrer Arbeit unzufrieden zu sein.",
    "Die Brücke ist marode und muss in den nächsten Jahren ersetzt werden.",
    "Die Partei hat sich auf einen neuen Vorsitzenden geeinigt.",
    "Der Ölpreis ist wegen der Spannungen im Nahen Osten stark gestiegen.",
    "Die Schauspielerin erzählt in ihrem Buch von ihrer schwierigen Kindheit.",
    "Die Stadtwerke erhöhen zum Jahresbeginn die Preise für Gas und Wasser.",
    "Mehrere Tausend Menschen demonstrierten am Samstag für mehr Klimaschutz.",
    "Die Software enthält eine Sicherheitslücke, die schnell geschlossen werden muss.",
    "Das Gericht gab der Klage der Anwohner gegen den Bau der Fabrik statt.",
    "Die Mannschaft verlor zum dritten Mal in Folge und steht nun auf dem letzten Platz.",
    "Die Zahl der Geburten ist in der Region zum ersten Mal seit Jahren gestiegen.",
    "Der Hersteller ruft wegen defekter Bremsen mehrere Tausend Fahrräder zurück.",
    "Auf dem Weihnachtsmarkt werden in diesem Jahr mehr Besucher erwartet.",
    "Die Kommission legte einen Plan zur Reform des Rentensystems vor.",
    "Wissenschaftler haben ein Medikament entwickelt, das den Verlauf der Krankheit verlangsamt.",
    "Die Reederei setzt künftig Schiffe ein, die mit Flüssiggas fahren.",
    "Das Hochwasser hat die Altstadt in der Nacht erreicht.",
    "Die Firma wurde für ihre nachhaltige Produktion ausgezeichnet.",
    "Die Lehrer beklagen zu große Klassen und zu wenig Personal.",
    "Der Minister trat nach wochenlanger Kritik von seinem Amt zurück.",
    "Die Inflation lag im November bei 2,3 Prozent.",
    "Der Marathon führte die Läufer durch die schönsten Viertel der Stadt.",
    "Die Polizei hat am Dienstag zwei Verdächtige festgenommen.",
    "Das Museum erhielt eine großzügige Spende eines privaten Sammlers.",
    "Die Bürger können ab sofort ihren Ausweis online beantragen.",
]
GERMAN_TEMPLATES = [
    "Translate German to English: {s}",
    "Translate the following German text into English: {s}",
]

QUESTION_FORMS = [
    ("Who wrote {x}?", ["Pride and Prejudice", "Moby-Dick", "War and Peace", "The Odyssey", "Don Quixote", "Hamlet",
                        "Nineteen Eighty-Four", "The Great Gatsby", "Frankenstein", "Jane Eyre", "The Little Prince",
                        "Crime and Punishment", "The Hobbit", "Les Misérables", "Faust"]),
    ("What is the capital of {x}?", ["Canada", "Australia", "Brazil", "Kenya", "Japan", "Egypt", "Argentina", "Poland",
                                     "Turkey", "Vietnam", "Sweden", "Chile", "Nigeria", "Thailand", "Switzerland"]),
    ("When did {x} take place?", ["the French Revolution", "the first moon landing", "the fall of the Berlin Wall",
                                  "the Battle of Hastings", "the signing of the Magna Carta", "the first modern Olympic Games",
                                  "the sinking of the Titanic", "the Russian Revolution", "the Boston Tea Party",
                                  "the end of World War II"]),
    ("Who invented {x}?", ["the telephone", "the light bulb", "the World Wide Web", "the printing press", "dynamite",
                           "the steam engine", "the airplane", "the radio", "the telescope", "the diesel engine"]),
    ("Where is {x} located?", ["the Eiffel Tower", "Machu Picchu", "the Taj Mahal", "Mount Kilimanjaro", "the Great Barrier Reef",
                               "the Colosseum", "Angkor Wat", "Stonehenge", "the Acropolis", "the Grand Canyon",
                               "Petra", "the Sahara Desert"]),
    ("What does {x} stand for?", ["NASA", "UNESCO", "GDP", "HTML", "DNA", "CPU", "NATO", "WHO", "USB", "PDF", "SQL", "LED"]),
    ("How many {x}?", ["bones are there in the adult human body", "players are on a basketball team on court",
                       "planets are in the solar system", "strings does a standard guitar have", "days are in a leap year",
                       "keys does a standard piano have", "teeth does an adult human have", "legs does a spider have",
                       "sides does a hexagon have", "minutes are in a day"]),
    ("Who was {x}?", ["Marie Curie", "Leonardo da Vinci", "Nelson Mandela", "Ada Lovelace", "Genghis Khan", "Frida Kahlo",
                      "Isaac Newton", "Cleopatra", "Mahatma Gandhi", "Ludwig van Beethoven", "Alan Turing", "Joan of Arc"]),
]


def _word_problem_2(rng: random.Random) -> str:
    n, m = rng.sample(NAMES, 2)
    a, b, c = rng.randint(10, 90), rng.randint(2, 12), rng.randint(2, 9)
    pct = rng.choice([10, 15, 20, 25, 30, 40, 50])
    price = rng.randint(5, 120)
    forms = [
        f"A jacket costs ${price * 4}. It is on sale for {pct}% off. What is the sale price?",
        f"{n} scored {a}, {a + b}, and {a - c} points in three games. What was the average score?",
        f"{n} is {b} years older than {m}. In {c} years their ages will add up to {2 * a + b + 2 * c}. How old is {m} now?",
        f"A recipe needs {b} cups of flour for {c} servings. How much flour is needed for {c * 3} servings?",
        f"A tank holds {a * 10} liters. It is {pct}% full. How many more liters are needed to fill it?",
        f"{n} saves ${b * 5} every week. How many weeks will it take to save ${b * 5 * c * 4}?",
        f"The ratio of cats to dogs at a shelter is {c}:{b}. There are {c * a} cats. How many dogs are there?",
        f"{n} walks {b} kilometers in {c * 15} minutes. At the same pace, how long does it take to walk {b * 3} kilometers?",
        f"A farmer has {a} chickens and {b * 3} cows. How many legs do the animals have in total?",
        f"{n} bought {b} notebooks at ${c} each and {c} pens at ${b // 2 + 1} each. {n} paid with ${b * c + c * (b // 2 + 1) + 10}. How much change was left?",
    ]
    return rng.choice(forms) + rng.choice(["", " Explain your reasoning.", " Show the steps.", " Let's think step by step."])


def more_prompts(seed: int = 0, start_id: int = 20_000) -> list[dict]:
    """The second set, ~1,100 instructions, deterministic in `seed`; ids from `start_id` on."""
    rng = random.Random(seed + 1)
    rows: list[tuple[str, str]] = []
    for t in TOPICS_2:
        for cat, tpl in rng.sample(TEMPLATES_2, 5):
            rows.append((cat, tpl.format(t=t)))
    for p in PLACES:
        for cat, tpl in PLACE_TEMPLATES:
            rows.append((cat, tpl.format(p=p)))
    for who in PERSONAS:
        for q in rng.sample(PERSONA_QUESTIONS, 3):
            rows.append(("roleplay", f"Pretend to be {who} in this conversation. {q}"))
    for s in GERMAN:
        for tpl in GERMAN_TEMPLATES:
            rows.append(("translation", tpl.format(s=s)))
    for form, xs in QUESTION_FORMS:
        for x in xs:
            rows.append(("qa", form.format(x=x)))
    for _ in range(160):
        rows.append(("math", _word_problem_2(rng)))
    rows = list({text: (cat, text) for cat, text in rows}.values())  # a word problem may come twice
    rng.shuffle(rows)
    return [{"id": start_id + i, "category": cat, "prompt": text} for i, (cat, text) in enumerate(rows)]


# ---------------------------------------------------------------------------- the papers' set
# Spec-Bench's copy-heavy tasks (summarization, retrieval-augmented QA) give the model a passage of
# some 500 words and ask for a summary or an answer from it; the first two sets' passages are the
# Python documentation's, 60-220 words. The PyPI package `aclsum` (installed with `--no-deps`; its
# data is read without importing it) ships the full text of 250 ACL papers. This set cuts their
# body text into passages of 150-550 words (consecutive paragraphs of one section) and asks for
# summaries, answers and explanations of them. Ids from 40,000; opt-in (`--prompts papers`).

PAPER_TEMPLATES = [
    ("summarization", "Summarize: {p}"),
    ("summarization", "Summarize the following text in a few sentences:\n\n{p}"),
    ("summarization", "{p}\n\nWrite a short summary of the passage above."),
    ("summarization", "Give the main points of this excerpt from a research paper as a short paragraph:\n\n{p}"),
    ("rag", "{p}\n\n{q}"),
    ("rag", "Answer the question using the text below.\n\nText: {p}\n\nQuestion: {q}"),
    ("rag", "{p} {q}"),
    ("explain", "Explain the following passage to someone who is not an expert:\n\n{p}"),
    ("extraction", "{p}\n\nList the technical terms used in this passage and say what each means."),
    ("writing", "{p}\n\nWrite a title for this passage and explain your choice."),
]

PAPER_QUESTIONS = {
    "introduction": ["What problem does this text describe?", "Why is this problem hard, according to the text?",
                     "What do the authors propose?", "What are the contributions listed here?"],
    "method": ["How does the method described here work?", "What are the inputs and outputs of the model described?",
               "What is the main idea of this approach?", "Which steps does the procedure have?"],
    "results": ["What were the results?", "Which system performed best, according to the text?",
                "What do the authors conclude from their experiments?", "How was the evaluation done?"],
    "other": ["What is the main point of this passage?", "What does the passage say about previous work?",
              "Which datasets or resources are mentioned?", "What limitation is mentioned in the text?"],
}


def _section_kind(name: str) -> str:
    n = name.lower()
    if "intro" in n or "motivation" in n:
        return "introduction"
    if any(w in n for w in ("result", "experiment", "evaluat", "analysis", "conclusion", "discussion")):
        return "results"
    if any(w in n for w in ("method", "model", "approach", "framework", "architecture", "algorithm")):
        return "method"
    return "other"


def paper_passages(min_words: int = 150, max_words: int = 550) -> list[tuple[str, str]]:
    """(section kind, passage) from the `aclsum` package's papers, in file order; [] if it is absent."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.find_spec("aclsum")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(list(spec.submodule_search_locations)[0]) / "dataset" / "paper_jsons"
    out = []
    for path in sorted(folder.glob("*.json")):
        body = json.loads(path.read_text())["pdf_parse"]["body_text"]
        chunk: list[str] = []
        section = None
        for para in body + [{"text": "", "section": None}]:  # a sentinel flushes the last chunk
            text = " ".join(para["text"].split())
            if chunk and (para["section"] != section or
                          len(" ".join(chunk).split()) + len(text.split()) > max_words):
                joined = " ".join(chunk)
                if len(joined.split()) >= min_words:
                    out.append((_section_kind(section or ""), joined))
                chunk = []
            section = para["section"]
            if text and len(text.split()) <= max_words:
                chunk.append(text)
    return out


def paper_prompts(seed: int = 0, start_id: int = 40_000) -> list[dict]:
    """The papers' set: one instruction per passage of `paper_passages`, deterministic in `seed`."""
    rng = random.Random(seed + 2)
    rows = []
    for kind, p in paper_passages():
        cat, tpl = rng.choice(PAPER_TEMPLATES)
        rows.append((cat, tpl.format(p=p, q=rng.choice(PAPER_QUESTIONS[kind]))))
    rng.shuffle(rows)
    return [{"id": start_id + i, "category": cat, "prompt": text} for i, (cat, text) in enumerate(rows)]


# ---------------------------------------------------------------------------- the third set
# Per answer, instructions shaped like Spec-Bench's tasks teach the head most about them (1,000 of
# the first sets' instructions: teacher-forced Spec-Bench top-1 0.272; 1,000 the model wrote
# itself: 0.237; 1,000 about research papers' passages: 0.194). So a third set of the same kinds,
# all new: topics and MT-Bench-like tasks, German news sentences, short factual questions in the
# style of search queries, and multi-step word problems. Ids from 50,000; opt-in (`--prompts third`).

TOPICS_3 = [
    "the Hanseatic League", "the Ming dynasty", "the Maya civilization", "the Reformation", "the Enlightenment",
    "the abolition of slavery", "the women's suffrage movement", "the Marshall Plan", "the space race",
    "the history of the bicycle", "the history of chocolate", "the telegraph", "public libraries in small towns",
    "the postal service", "time zones", "calendars", "lighthouses", "canals", "high-speed rail", "container ships",
    "electric scooters", "traffic lights", "roundabouts", "air quality", "drinking water", "droughts",
    "wildfires", "floods", "landslides", "the ozone layer", "heat pumps", "home insulation", "carbon capture",
    "tidal energy", "geothermal energy", "the carbon cycle", "cell division", "proteins", "enzymes", "viruses",
    "bacteria in the gut", "hearing", "eyesight", "dreams", "human memory", "habits", "procrastination",
    "motivation", "loneliness", "grandparents", "siblings", "cats", "parrots", "horses", "whales", "frogs",
    "butterflies", "spiders", "owls", "salmon", "tea", "olive oil", "food waste", "home cooking", "soup",
    "breakfast", "houseplants", "minimalism", "second-hand shopping", "saving money", "index funds", "banks",
    "small shops", "farmers' markets", "job promotions", "feedback at work", "meetings", "email overload",
    "mentoring", "volunteering abroad", "learning to swim", "learning to drive", "reading habits", "audiobooks",
    "podcasts", "novels", "short stories", "theatre", "ballet", "folk music", "rock music", "choirs",
    "street art", "sculpture", "pottery", "origami", "crossword puzzles", "card games", "table tennis",
    "golf", "skiing", "surfing", "rowing", "hiking", "birdwatching", "stargazing", "the Moon", "Jupiter",
    "the Sun", "meteor showers", "rockets", "space stations", "telescopes", "microscopes", "thermometers",
    "clocks", "the history of the calendar", "keyboards", "touch screens", "spam filters", "web accessibility",
    "password reset emails", "backups", "file formats", "text editors", "pair programming", "technical debt",
    "stacks and queues", "graphs in computer science", "caching", "error messages", "software licenses",
]

TEMPLATES_3 = [
    ("writing", "Write a persuasive essay of about 200 words on why people should care about {t}."),
    ("writing", "Compose a short poem about {t}."),
    ("writing", "Write a blog post introduction about {t} that makes readers want to keep reading."),
    ("writing", "Write a short story in which {t} plays an important part."),
    ("stem", "Explain {t} as if I were ten years old."),
    ("stem", "What are the three most important facts about {t}? Explain each briefly."),
    ("humanities", "Compare {t} with {u}. How are they similar and how are they different?"),
    ("humanities", "Why do people disagree about {t}? Describe the main points of view."),
    ("reasoning", "Imagine the world in fifty years. How might {t} be different, and why?"),
    ("reasoning", "A friend says {t} is overrated. How would you respond? Give reasons."),
    ("qa", "What is {t}? Answer in two or three sentences."),
    ("extraction", "List five key terms related to {t} and define each in one sentence."),
    ("coding", "Write a Python function that could be useful in a program about {t}, and explain how it works."),
    ("summarization", "Summarize what a beginner should know about {t} in one paragraph."),
    ("roleplay", "You are a teacher. Give a short lesson about {t} to a class of teenagers."),
    ("advice", "I want to get better at understanding {t}. Where should I start?"),
    ("chat", "Tell me something surprising about {t}."),
    ("math", "Create a word problem involving {t} that needs two steps to solve, then solve it."),
]

GERMAN_3 = [
    "Die Stadtverwaltung will bis Ende des Jahres hundert neue Bäume pflanzen.",
    "Nach dem Unwetter waren mehrere Straßen in der Innenstadt gesperrt.",
    "Der Bundestag hat am Donnerstag ein neues Gesetz zum Klimaschutz beschlossen.",
    "Die Zahl der Touristen ist im Sommer deutlich gestiegen.",
    "Der Verein feiert in diesem Jahr sein hundertjähriges Bestehen.",
    "Die Preise für Lebensmittel sind im Vergleich zum Vorjahr gestiegen.",
    "Ein Sprecher des Unternehmens wollte sich zu den Vorwürfen nicht äußern.",
    "Die Schule bekommt eine neue Turnhalle, die im Herbst eröffnet werden soll.",
    "Die Feuerwehr konnte den Brand nach zwei Stunden löschen.",
    "Der Trainer zeigte sich nach dem Spiel zufrieden mit seiner Mannschaft.",
    "Die Ausstellung zeigt Werke von Künstlern aus ganz Europa.",
    "Viele Pendler mussten wegen des Streiks auf das Auto umsteigen.",
    "Die Forscher haben eine neue Art von Schmetterlingen entdeckt.",
    "Der Bürgermeister eröffnete am Samstag den Weihnachtsmarkt.",
    "Die Regierung plant, die Steuern für kleine Unternehmen zu senken.",
    "Im Krankenhaus fehlen seit Monaten Pflegekräfte.",
    "Die Bahn kündigte an, mehr Züge auf der Strecke einzusetzen.",
    "Das Konzert musste wegen des schlechten Wetters abgesagt werden.",
    "Die Studie zeigt, dass Kinder zu wenig Zeit im Freien verbringen.",
    "Der neue Flughafen wird voraussichtlich im nächsten Frühjahr eröffnet.",
    "Die Polizei sucht nach Zeugen des Unfalls.",
    "Der Autor liest am Freitagabend in der Stadtbibliothek aus seinem neuen Roman.",
    "Die Arbeitslosigkeit ist im vergangenen Monat leicht gesunken.",
    "Die beiden Länder haben ein Abkommen über den Handel unterzeichnet.",
    "Der Fluss trat nach tagelangem Regen über die Ufer.",
    "Die Universität bietet ab dem Wintersemester einen neuen Studiengang an.",
    "Das Unternehmen will in den nächsten drei Jahren tausend neue Stellen schaffen.",
    "Die Bürger wurden gebeten, Wasser zu sparen.",
    "Der Film gewann beim Festival den Preis für die beste Regie.",
    "Die Mieten in den großen Städten steigen weiter.",
    "Die Gemeinde diskutiert über den Bau eines neuen Schwimmbads.",
    "Der Präsident traf sich mit Vertretern der Gewerkschaften.",
    "Die Wissenschaftler warnen vor den Folgen der Erderwärmung.",
    "Nach langen Verhandlungen einigten sich die Parteien auf einen Kompromiss.",
    "Die Sängerin beginnt im März ihre Tournee durch Deutschland.",
    "Die Brücke muss wegen Bauarbeiten für sechs Monate gesperrt werden.",
    "Das Museum ist am Montag wegen einer Veranstaltung geschlossen.",
    "Immer mehr Menschen fahren mit dem Fahrrad zur Arbeit.",
    "Der Verkehrsminister stellte am Mittwoch seine Pläne vor.",
    "Die Mannschaft verlor das Spiel in der letzten Minute.",
    "Die Ärzte raten, sich gegen Grippe impfen zu lassen.",
    "Die Firma hat einen neuen Geschäftsführer ernannt.",
    "Der Schnee sorgte am Morgen für Chaos auf den Straßen.",
    "Die Kinder sammelten Spenden für ein Tierheim.",
    "Die Ernte fiel wegen der Trockenheit geringer aus als erwartet.",
    "Das Theater zeigt in dieser Saison fünf neue Stücke.",
    "Die Polizei kontrollierte am Wochenende mehr als tausend Fahrzeuge.",
    "Die Verhandlungen über den neuen Vertrag sollen nächste Woche fortgesetzt werden.",
    "Der Minister kündigte weitere Hilfen für die Landwirte an.",
    "Die Kosten für das Projekt sind höher als geplant.",
    "Die Stadt hat ein neues System für den Nahverkehr eingeführt.",
    "Das Gericht wies die Klage des Unternehmens ab.",
    "Der Weltmeister gewann auch das Rennen am Sonntag.",
    "Die Zahl der Geburten ist im vergangenen Jahr gesunken.",
    "Eine Umfrage zeigt, dass viele Menschen mit ihrer Arbeit zufrieden sind.",
    "Die Straße wird ab Montag in beide Richtungen gesperrt.",
    "Die Bank erhöhte die Zinsen zum dritten Mal in diesem Jahr.",
    "Die Schüler protestierten vor dem Rathaus für mehr Klimaschutz.",
    "Der Hafen ist einer der wichtigsten Umschlagplätze in Europa.",
    "Die Regierung will mehr Geld in die Bildung investieren.",
    "Die Ausstellung war bereits am ersten Tag ausverkauft.",
    "Der Sturm hat in der Nacht zahlreiche Bäume entwurzelt.",
    "Die Ärztin erklärte, wie man sich vor der Hitze schützen kann.",
    "Die Partei hat ihren Kandidaten für die Wahl bestimmt.",
    "Die Zahl der Elektroautos auf deutschen Straßen hat sich verdoppelt.",
    "Der Zoo freut sich über den Nachwuchs bei den Elefanten.",
    "Die Opposition kritisierte den Haushaltsplan scharf.",
    "Die Forscher untersuchen, wie sich der Meeresspiegel verändert.",
    "Die Veranstalter rechnen mit mehr als zwanzigtausend Besuchern.",
    "Das neue Gesetz tritt am ersten Januar in Kraft.",
    "Die Feuerwehr rettete eine Katze von einem Baum.",
    "Der Konzern meldete für das dritte Quartal einen Gewinn.",
    "Die Stadt plant einen neuen Radweg entlang des Flusses.",
    "Die Lehrer fordern kleinere Klassen und mehr Personal.",
    "Der Flug nach Berlin hatte wegen Nebels drei Stunden Verspätung.",
    "Die Regierung hat die Grenzkontrollen vorübergehend verschärft.",
    "Die Band veröffentlichte nach zehn Jahren ein neues Album.",
    "Die Bauarbeiten am Bahnhof sollen im Sommer abgeschlossen sein.",
    "Die Polizei warnt vor betrügerischen Anrufen.",
    "Der Hersteller ruft mehrere tausend Autos in die Werkstätten zurück.",
]
GERMAN_TEMPLATES_3 = [
    "Translate German to English: {s}",
    "Translate this German sentence into English: {s}",
    "Please translate from German into English: {s}",
]

SEARCH_QUESTIONS = [
    "who wrote the song imagine", "who painted the mona lisa", "who discovered penicillin",
    "who was the first person to walk on the moon", "who invented the bicycle", "who wrote the harry potter books",
    "who composed the four seasons", "who built the great wall of china", "who was the first president of the united states",
    "who discovered gravity", "who sang thriller", "who directed jurassic park", "who wrote romeo and juliet",
    "who founded microsoft", "who developed the theory of relativity", "who was the first woman to win a nobel prize",
    "when was the eiffel tower built", "when did the titanic sink", "when was the first iphone released",
    "when did world war 1 start", "when was the declaration of independence signed", "when did the berlin wall fall",
    "when was the internet invented", "when did the first man go to space", "when was the euro introduced",
    "when was the statue of liberty built", "when did the roman empire fall", "when was the first olympic games held",
    "where is mount everest", "where is the amazon river", "where was the first world cup held",
    "where is the largest desert in the world", "where do penguins live", "where is the great barrier reef",
    "where was pizza invented", "where is the statue of liberty", "where is the headquarters of the united nations",
    "where was shakespeare born", "where is the sahara desert", "where do kangaroos live",
    "how many continents are there", "how many states are in the united states", "how many bones does a baby have",
    "how many players are on a football team", "how many hearts does an octopus have", "how many countries are in europe",
    "how many moons does mars have", "how many oceans are there", "how many languages are spoken in india",
    "how many chambers does the human heart have", "how long is the great wall of china", "how tall is mount everest",
    "how deep is the pacific ocean", "how old is the universe", "how far is the moon from the earth",
    "how long does it take light from the sun to reach earth", "what is the largest planet in the solar system",
    "what is the smallest country in the world", "what is the longest river in the world",
    "what is the capital of australia", "what is the boiling point of water", "what is the speed of light",
    "what is the chemical symbol for gold", "what language is spoken in brazil", "what is the currency of japan",
    "what is the tallest building in the world", "what is the hardest natural substance",
    "what is the largest mammal", "what is the main ingredient in guacamole", "what does a thermometer measure",
    "what is the largest organ of the human body", "what causes the seasons", "what is the fastest land animal",
    "what is the national animal of scotland", "what is the most spoken language in the world",
    "which planet is known as the red planet", "which country has the largest population",
    "which ocean is the largest", "which element has the atomic number 1", "which animal is the tallest",
    "which city hosted the 2012 olympics", "which country gifted the statue of liberty", "which bird cannot fly",
    "which is the coldest place on earth", "which metal is liquid at room temperature",
    "why is the sky blue", "why do leaves change color in autumn", "why do we have leap years",
    "why is the ocean salty", "why do cats purr", "why does the moon change shape",
]

QUESTION_TEMPLATES_3 = ["{q}", "{q}?", "Question: {q}?", "Answer briefly: {q}?"]


def _word_problem_3(rng: random.Random) -> str:
    n, m = rng.sample(NAMES, 2)
    a, b, c, d = rng.randint(10, 80), rng.randint(2, 15), rng.randint(2, 9), rng.randint(3, 30)
    pct = rng.choice([5, 10, 12, 20, 25, 50])
    forms = [
        f"{n} bakes {a} cookies. {n} eats {c} of them and packs the rest into boxes of {b}. How many full boxes does {n} have?",
        f"A bus has {a} passengers. At the first stop {d} get off and {c} get on. At the second stop half of the passengers get off. How many are left?",
        f"{n} runs {c} kilometers every weekday and twice as far on Saturday. How many kilometers does {n} run in a week?",
        f"A shirt costs ${d} and a pair of shoes costs {c} times as much. {n} buys two shirts and one pair of shoes. How much does {n} spend?",
        f"{n} has ${a * 10}. {n} spends {pct}% of it on a gift and ${d} on lunch. How much money is left?",
        f"A garden is {b} meters long and {c} meters wide. Fence costs ${d} per meter. How much does it cost to fence the whole garden?",
        f"{n} is reading a book with {a * 5} pages. {n} read {b} pages on Monday and twice as many on Tuesday. How many pages are left?",
        f"A factory makes {a} toys an hour and works {c} hours a day. How many toys does it make in {b} days?",
        f"{n} and {m} collect stamps. {n} has {a} stamps and {m} has {d} more than {n}. How many stamps do they have together?",
        f"A class of {a} students goes on a trip. Each van holds {c} students. How many vans are needed?",
        f"{n} buys {b} kilograms of apples at ${c} per kilogram and {c} kilograms of pears at ${b} per kilogram. What is the total cost?",
        f"A movie starts at 7:{10 + c * 5} pm and lasts {90 + d} minutes. At what time does it end?",
    ]
    return rng.choice(forms) + rng.choice(["", " Explain your answer.", " Solve it step by step.",
                                           " Give the final answer as a number."])


def third_prompts(seed: int = 0, start_id: int = 50_000) -> list[dict]:
    """The third templated set, deterministic in `seed`; ids from `start_id` on."""
    rng = random.Random(seed + 3)
    rows: list[tuple[str, str]] = []
    for t in TOPICS_3:
        for cat, tpl in rng.sample(TEMPLATES_3, 6):
            rows.append((cat, tpl.format(t=t, u=rng.choice([x for x in TOPICS_3 if x != t]))))
    for s in GERMAN_3:
        for tpl in GERMAN_TEMPLATES_3:
            rows.append(("translation", tpl.format(s=s)))
    for q in SEARCH_QUESTIONS:
        for tpl in rng.sample(QUESTION_TEMPLATES_3, 2):
            rows.append(("qa", tpl.format(q=q)))
    for _ in range(300):
        rows.append(("math", _word_problem_3(rng)))
    rows = list({text: (cat, text) for cat, text in rows}.values())  # a word problem may come twice
    rng.shuffle(rows)
    return [{"id": start_id + i, "category": cat, "prompt": text} for i, (cat, text) in enumerate(rows)]
