"""The broad prompt set the target answers to make the base drafter's pretraining data (actors/pretrain.py).

Templates over topic lists, so that the set is varied (explanations, advice, stories, emails, lists, code in
several languages, code reading, debugging) without being anyone's benchmark: no prompt of ``bench/phases/``
is here, and `onspec drafter pretrain` never reads those files (they are the held-out prompts the bars are
measured on). ``pretrain_prompts(n, seed)`` draws n distinct prompts in a seeded order.
"""
from __future__ import annotations

import itertools
import random

TOPICS = [
    # science and nature
    "photosynthesis", "black holes", "plate tectonics", "the water cycle", "volcanoes", "coral reefs",
    "the immune system", "DNA", "electricity", "magnetism", "gravity", "the speed of light", "earthquakes",
    "tides", "the human heart", "sleep", "bees", "migrating birds", "deserts", "rainforests", "glaciers",
    "the periodic table", "atoms", "evolution", "bacteria", "the Moon", "Mars", "comets", "solar energy",
    "wind turbines", "recycling", "soil", "mushrooms", "octopuses", "whales", "memory", "the brain",
    # history and society
    "the printing press", "the Silk Road", "ancient Greece", "the Industrial Revolution", "the Renaissance",
    "the Vikings", "the Olympic Games", "democracy", "the French Revolution", "the invention of the telephone",
    "the history of money", "castles", "trade unions", "the Great Wall of China", "the Aztecs", "libraries",
    "the steam engine", "maps and cartography", "the history of the bicycle", "public transport",
    # technology
    "the internet", "smartphones", "artificial intelligence", "cloud computing", "passwords", "encryption",
    "databases", "open source software", "electric cars", "3D printing", "GPS", "robots", "video games",
    "social media", "email", "computer viruses", "batteries", "satellites", "search engines", "spreadsheets",
    # everyday life, culture, economics
    "coffee", "tea", "chocolate", "cheese", "bread baking", "gardening", "camping", "chess", "jazz",
    "classical music", "painting with watercolors", "photography", "learning a new language", "public speaking",
    "time management", "saving money", "taxes", "interest rates", "supply and demand", "small businesses",
    "teamwork", "friendship", "volunteering", "meditation", "yoga", "cycling", "swimming", "football",
    "basketball", "marathons", "healthy breakfasts", "drinking enough water", "minimalism", "board games",
    "museums", "poetry", "novels", "movies", "theater", "architecture", "bridges", "trains", "airplanes",
    "ships", "cities", "villages", "islands", "mountains", "rivers", "the ocean", "winter", "spring",
]

SKILLS = [
    "cooking", "writing", "drawing", "playing the guitar", "negotiating", "giving feedback", "listening",
    "typing", "juggling", "public speaking", "chess", "photography", "swimming", "programming", "math",
    "remembering names", "managing a team", "studying for exams", "keeping a tidy home", "waking up early",
    "making small talk", "learning Spanish", "knitting", "baking cakes", "budgeting", "meal planning",
]

EVENTS = [
    "my first day at a new job", "moving to a new city", "a long train journey", "a camping trip",
    "my sister's wedding", "a driving test", "a school presentation", "a family reunion", "a dentist visit",
    "adopting a dog", "starting university", "a hiking weekend", "hosting a dinner party", "a marathon",
]

CHAT_TEMPLATES = [
    "Explain {t} in simple terms.",
    "What are the main advantages and disadvantages of {t}?",
    "Write a short paragraph about {t}.",
    "Give me three interesting facts about {t}.",
    "How would you explain {t} to a ten-year-old?",
    "Briefly, what is the history of {t}?",
    "Write a short poem about {t}.",
    "What are some common misconceptions about {t}?",
    "What should a beginner know about {t}?",
    "Write a friendly email inviting a colleague to a talk about {t}.",
    "Summarize the key ideas behind {t} in a few sentences.",
    "What questions could I ask an expert on {t}?",
    "Compare {t} and {u}.",
    "Write a two-paragraph story that involves {t}.",
    "How does {t} affect everyday life?",
    "Write a short dialogue between two friends talking about {t}.",
    "Give me a quiz of five questions about {t}, with answers.",
    "What is one surprising thing about {t}?",
    "Describe {t} in the style of a travel guide.",
    "Write a tweet-length summary of {t}.",
]

SKILL_TEMPLATES = [
    "How can I get better at {s}?",
    "What are some tips for {s}?",
    "Make a four-week plan for someone who wants to improve at {s}.",
    "What mistakes do people often make when {s}?",
]

EVENT_TEMPLATES = [
    "I'm nervous about {e}. Any advice?",
    "Write a checklist for {e}.",
    "Write a short diary entry about {e}.",
]

LANGUAGES = ["Python", "JavaScript", "TypeScript", "Go", "Rust", "Java", "C++", "Ruby", "Bash"]

CODE_TASKS = [
    "computes the factorial of a number", "merges two sorted lists into one sorted list",
    "finds the most common element in a list", "converts Celsius to Fahrenheit",
    "checks whether two strings are anagrams", "removes all whitespace from a string",
    "returns the sum of the digits of an integer", "splits a list into chunks of size n",
    "computes the greatest common divisor of two numbers", "checks whether a year is a leap year",
    "finds the longest word in a sentence", "rotates a list by k positions", "transposes a matrix",
    "counts the lines in a text file", "returns the unique characters of a string in order",
    "computes the running average of a list of numbers", "parses a query string into a dictionary",
    "validates that a string contains only digits", "returns the n largest numbers of a list",
    "converts a Roman numeral to an integer", "generates all subsets of a set",
    "checks whether parentheses in a string are balanced", "implements bubble sort",
    "implements a simple LRU cache", "reads a file and prints its last ten lines",
    "computes the distance between two points", "groups words by their first letter",
    "converts a number to binary", "finds missing numbers in a range", "deep-copies a nested dictionary",
    "retries a function call up to three times", "formats a number of seconds as hours, minutes and seconds",
    "merges two dictionaries, summing values of common keys", "truncates a string to n characters with '...'",
]

CODE_CLASSES = [
    "a bank account with deposit and withdraw", "a queue backed by two stacks", "a simple to-do list",
    "a 2D vector with addition and length", "a temperature sensor log", "a shopping cart with totals",
    "a linked list with append and remove", "a timer that measures elapsed time", "a matrix with multiplication",
]

HOWTO = [
    "read a text file line by line", "sort a dictionary by its values", "make an HTTP GET request",
    "measure how long a function takes", "write a unit test", "handle exceptions properly",
    "create a virtual environment", "parse command-line arguments", "work with dates and time zones",
    "run two tasks concurrently", "format strings", "read environment variables", "log messages to a file",
    "iterate over two lists at the same time", "copy a file", "generate random numbers",
]

CONCEPTS = [
    "recursion", "a hash table", "a closure", "an API", "a race condition", "garbage collection",
    "immutability", "a generator", "dependency injection", "unit testing", "a linked list", "a REST endpoint",
    "type hints", "a mutex", "caching", "Git branches", "a Docker container", "an SQL index", "regular expressions",
    "list comprehensions", "async and await", "object-oriented programming", "functional programming",
]

SNIPPETS = [
    "total = sum(n for n in numbers if n > 0)",
    "names = sorted(people, key=lambda p: p.age)",
    "with open('log.txt') as f: errors = [l for l in f if 'ERROR' in l]",
    "counts = {}; for w in words: counts[w] = counts.get(w, 0) + 1",
    "const doubled = values.map(v => v * 2).filter(v => v > 10);",
    "SELECT city, AVG(price) FROM houses GROUP BY city HAVING COUNT(*) > 5;",
    "ls -1 | wc -l",
    "pairs = list(zip(keys, values))",
    "while queue: node = queue.pop(0); queue.extend(node.children)",
]


def _chat_prompts() -> list[str]:
    out = []
    pairs = list(zip(TOPICS, TOPICS[7:] + TOPICS[:7]))
    for tpl in CHAT_TEMPLATES:
        for t, u in pairs:
            out.append(tpl.format(t=t, u=u))
    out += [tpl.format(s=s) for tpl in SKILL_TEMPLATES for s in SKILLS]
    out += [tpl.format(e=e) for tpl in EVENT_TEMPLATES for e in EVENTS]
    return out


def _code_prompts() -> list[str]:
    out = [f"Write a {lang} function that {task}." for lang, task in itertools.product(LANGUAGES, CODE_TASKS)]
    out += [f"Write a Python class for {c}." for c in CODE_CLASSES]
    out += [f"How do I {h} in {lang}?" for h, lang in itertools.product(HOWTO, LANGUAGES[:4])]
    out += [f"Explain {c} with a short code example." for c in CONCEPTS]
    out += [f"What does this code do? {s}" for s in SNIPPETS]
    out += [f"Write a docstring and type hints for a Python function that {t}." for t in CODE_TASKS]
    out += [f"Write unit tests for a Python function that {t}." for t in CODE_TASKS]
    return out


def pretrain_prompts(n: int | None = None, seed: int = 0) -> list[list[dict]]:
    """``n`` distinct chat prompts (all when None), chat and code interleaved half and half, in a seeded
    order: a run that makes fewer answers still covers both kinds of text."""
    rng = random.Random(seed)
    chat, code = _chat_prompts(), _code_prompts()
    rng.shuffle(chat)
    rng.shuffle(code)
    mixed = [p for pair in itertools.zip_longest(chat, code) for p in pair if p is not None]
    return [[{"role": "user", "content": p}] for p in mixed[:n]]
