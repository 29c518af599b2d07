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


# ---- everyday requests, in the words people use (advice, how things work, cooking, travel, writing, facts,
# differences, recommendations, health, money, home, work, numbers, text to rework). Each category below is a
# template family over its own slots; pretrain_prompts draws the families in turn, so that no single one (the
# topic templates above are the largest) fills a short run.
GOALS = [
    "sleep better", "make friends in a new city", "ask my boss for a raise", "stop procrastinating",
    "keep my kitchen clean", "train my puppy to walk on a leash", "save for a holiday", "drink less coffee",
    "deal with a noisy neighbour", "get back into exercise after an injury", "read more books", "cook more at home",
    "spend less time on my phone", "prepare for a long exam", "make my small apartment feel bigger",
    "keep in touch with old friends", "learn to swim as an adult", "get over a breakup", "be more confident",
    "organize my closet", "start journaling", "wake up without snoozing", "eat more vegetables",
    "support a friend who is grieving", "handle criticism at work", "plan a surprise party",
    "keep my cat entertained", "start a vegetable garden on a balcony", "stop biting my nails",
    "negotiate the price of a used car", "find a good doctor", "get my kids to do their homework",
]

SITUATIONS = [
    "I just moved into my first apartment", "my laptop is running really slowly", "I keep forgetting people's names",
    "my teenage son won't talk to me", "I got a parking ticket I think is unfair", "my coworker takes credit for my work",
    "I can't decide between two job offers", "my dog barks at every visitor", "I have too many open browser tabs",
    "my roommate never does the dishes", "I feel tired every afternoon", "I have a presentation in front of 200 people",
    "my phone battery dies before lunch", "I want to change careers at 40", "my neighbour's tree hangs over my fence",
    "I locked myself out of my email account", "I was overcharged at a restaurant", "my bike chain keeps falling off",
]

PHENOMENA = [
    "fog", "rust", "hiccups", "static electricity", "ocean waves", "the northern lights", "snowflakes", "yawning",
    "goosebumps", "a sunburn", "wind", "echoes", "earthquakes", "dew on the grass", "a fever", "jet streams",
    "tides", "bruises", "brain freeze", "the smell of rain", "cavities", "sneezing", "a solar eclipse",
    "hurricanes", "muscle cramps", "leaves changing colour", "a blue moon", "mould on bread",
]

DEVICES = [
    "a refrigerator", "a microwave oven", "a compass", "a digital camera", "noise-cancelling headphones",
    "a credit card", "a thermostat", "an elevator", "bicycle gears", "solar panels", "a jet engine",
    "the stock market", "a heat pump", "a touchscreen", "Wi-Fi", "a smoke detector", "a lock and key",
    "a hot air balloon", "an electric guitar", "a barcode scanner", "a dishwasher", "a submarine",
    "a nuclear power plant", "an MRI scanner", "a parachute", "a pressure cooker", "a hybrid car",
]

DISHES = [
    "banana bread", "chicken curry", "guacamole", "French toast", "lentil soup", "egg fried rice", "a Greek salad",
    "homemade pizza dough", "overnight oats", "roasted vegetables", "a green smoothie", "hummus", "mushroom risotto",
    "vegetarian chili", "a cheese omelette", "chocolate chip cookies", "blueberry muffins", "shakshuka",
    "tomato sauce from scratch", "a stir-fry with tofu", "apple crumble", "potato wedges", "fish tacos",
    "a simple curry with chickpeas", "carrot cake", "lemonade",
]

INGREDIENTS = ["rice", "broccoli", "salmon", "tofu", "potatoes", "chickpeas", "mushrooms", "leftover chicken",
               "quinoa", "zucchini", "sweet potatoes", "black beans", "spinach", "canned tuna", "cauliflower"]

PLACES = [
    "Rome", "Tokyo", "New York", "Barcelona", "Iceland", "Lisbon", "the Scottish Highlands", "Mexico City",
    "Kyoto", "Istanbul", "Cape Town", "Vancouver", "Prague", "Bali", "Sydney", "Amsterdam", "Marrakech",
    "Seoul", "Buenos Aires", "Vienna", "New Zealand's South Island", "Edinburgh", "Chicago", "Berlin",
]

TRIPS = [
    "a ski trip", "a three-day business trip", "a road trip across the country", "a hiking holiday in the Alps",
    "a trip with a toddler", "a winter city break", "a music festival", "a week of camping by a lake",
    "a long-haul flight", "backpacking through Southeast Asia", "a cruise", "a weekend at the seaside in spring",
]

LETTERS = [
    ("my landlord", "asking to fix a broken heater"), ("a hotel", "asking for a late check-out"),
    ("my child's teacher", "explaining why he missed school"), ("a customer", "apologizing for a late delivery"),
    ("a company", "applying for a marketing internship"), ("my team", "announcing a new weekly meeting"),
    ("a neighbour", "inviting them to a barbecue"), ("a client", "following up on an unpaid invoice"),
    ("my professor", "asking for an extension on an essay"), ("a friend", "congratulating her on a new job"),
    ("a recruiter", "politely declining a job offer"), ("a restaurant", "complaining about a cold meal"),
    ("my colleagues", "saying goodbye on my last day"), ("a gym", "cancelling my membership"),
]

POEM_FORMS = ["a short poem", "a haiku", "a limerick", "a four-line rhyming poem", "a free-verse poem",
              "a funny poem", "a sonnet", "song lyrics"]
POEM_SUBJECTS = [
    "the sea at night", "an old dog", "morning coffee", "city lights", "a snowy evening", "friendship",
    "a vegetable garden", "Monday mornings", "the stars", "a thunderstorm", "a first snowfall", "a grandmother's kitchen",
    "a lost umbrella", "spring rain", "a lighthouse", "a sleepy owl", "the last day of summer", "a busy train station",
]

CHARACTERS = ["a shy dragon", "a robot who wants to paint", "a young detective", "a lonely lighthouse keeper",
              "a clever fox", "a girl who can talk to birds", "an old sailor", "a lost kitten", "a time traveller",
              "two rival bakers", "a tiny astronaut", "a grumpy wizard"]
PLOTS = ["finds a mysterious map", "learns to make friends", "has to save the village", "gets lost in a big city",
         "discovers a hidden door", "enters a contest", "meets someone from the future", "loses something precious"]

PAIRS = [
    ("a virus", "a bacterium"), ("baking soda", "baking powder"), ("a crocodile", "an alligator"),
    ("stocks", "bonds"), ("'affect'", "'effect'"), ("a lake", "a pond"), ("RAM", "storage"),
    ("a latte", "a cappuccino"), ("a comet", "an asteroid"), ("a hurricane", "a tornado"),
    ("a credit card", "a debit card"), ("a psychologist", "a psychiatrist"), ("a fruit", "a vegetable"),
    ("an herb", "a spice"), ("a simile", "a metaphor"), ("a republic", "a democracy"), ("speed", "velocity"),
    ("a cold", "the flu"), ("a frog", "a toad"), ("a mortgage", "a loan"), ("a planet", "a star"),
    ("hardware", "software"), ("a will", "a trust"), ("an atom", "a molecule"), ("a tsunami", "a tidal wave"),
]

TERMS = [
    "opportunity cost", "a carbon footprint", "mindfulness", "a recession", "biodiversity", "GDP", "irony",
    "cognitive dissonance", "net worth", "the placebo effect", "supply chain", "a credit score", "a hypothesis",
    "photosynthesis", "an index fund", "impostor syndrome", "the greenhouse effect", "a calorie", "herd immunity",
    "a mortgage", "burnout", "the butterfly effect", "a black hole", "renewable energy", "a sabbatical",
]

PEOPLE = [
    "Marie Curie", "Leonardo da Vinci", "Nelson Mandela", "Ada Lovelace", "Isaac Newton", "Frida Kahlo",
    "Genghis Khan", "Cleopatra", "Albert Einstein", "Charles Darwin", "William Shakespeare", "Amelia Earhart",
    "Galileo Galilei", "Mahatma Gandhi", "Rosalind Franklin", "Nikola Tesla", "Jane Austen", "Alan Turing",
    "Queen Victoria", "Ludwig van Beethoven",
]

HISTORY = [
    "the Black Death", "the American Revolution", "the Cold War", "the Meiji Restoration", "the Apollo 13 mission",
    "the discovery of penicillin", "the building of the Panama Canal", "the invention of writing",
    "the fall of Constantinople", "the Gold Rush", "the sinking of the Titanic", "the first powered flight",
    "the Hundred Years' War", "the end of apartheid", "the Irish potato famine", "the Spanish flu",
]

GIFTS = ["a coworker who is retiring", "a teenager who likes science", "my dad, who loves cooking",
         "a new neighbour", "a friend who just had a baby", "someone who has everything", "a coffee lover",
         "my boyfriend, who plays video games", "a ten-year-old who loves animals", "my mum's 60th birthday"]

IDEAS = ["things to do with kids on a summer afternoon", "exercises I can do at home without equipment",
         "cheap date ideas", "hobbies to pick up in winter", "ways to make a long commute more pleasant",
         "team-building activities for a small office", "healthy snacks for work", "books for someone who likes mysteries",
         "names for a grey cat", "themes for a child's birthday party", "ways to reduce food waste at home",
         "easy houseplants for a dark room", "questions to ask on a first date", "side dishes for a barbecue"]

HABITS = ["drink coffee every day", "skip breakfast", "sit all day at a desk", "use my phone before bed",
          "crack my knuckles", "eat late at night", "sleep with the window open", "take a nap every afternoon",
          "run every day", "drink sparkling water"]

ACTIVITIES = ["walking every day", "stretching in the morning", "strength training", "drinking green tea",
              "cold showers", "cycling to work", "learning a musical instrument", "volunteering", "keeping a journal",
              "intermittent fasting", "playing chess", "spending time in nature"]

MONEY = ["pay off credit card debt", "start investing with a small amount", "build an emergency fund",
         "split rent fairly with roommates", "save for a house deposit", "cut my grocery bill",
         "understand my payslip", "plan for retirement in my thirties", "avoid impulse buying online"]

HOME = ["unclog a bathroom drain", "fix a squeaky door", "get rid of fruit flies", "clean a cast iron pan",
        "remove a coffee stain from a white shirt", "hang a picture straight", "keep my cat off the kitchen counter",
        "teach my dog to sit", "repot a plant", "fix a flat bike tyre", "descale a kettle", "paint a room quickly",
        "stop my windows from fogging up", "get rid of a musty smell in a cupboard", "sharpen a kitchen knife"]

WORK = ["run a good meeting", "write a strong CV", "handle a difficult coworker", "negotiate my salary",
        "give a short speech at a wedding", "ask for feedback", "say no to extra work politely",
        "prepare for a performance review", "introduce myself at a networking event", "manage my first team",
        "write a clear project update", "take better notes in lectures"]

CHOICES = ["working from home", "renting instead of buying a home", "electric scooters in cities", "homeschooling",
           "a four-day work week", "living in a big city", "having a pet", "online classes", "nuclear power",
           "social media for teenagers", "self-driving cars", "school uniforms", "studying abroad", "freelancing"]

DECISIONS = [("learn Python", "learn JavaScript first"), ("buy a laptop", "buy a desktop"),
             ("take a gap year", "start university right away"), ("rent a car", "take trains"),
             ("get a cat", "get a dog"), ("study in the morning", "study at night"),
             ("buy a new phone", "repair my old one"), ("lease a car", "buy one")]

SENTENCES = [
    "the meeting got moved to thursday because the boss was sick and nobody told us",
    "We are writing to inform you that your order has been shipped and will arrive soon.",
    "i think the movie was to long but the music was really good",
    "Our team finished the project two weeks early and under budget.",
    "The restaurant was noisy, the food was cold, and we waited an hour.",
    "Can you send me the report by Friday?",
    "This phone is amazing, the battery lasts for days!",
    "The new park downtown has a playground, a pond and a small cafe.",
    "He don't know nothing about cars but he fixed it anyway.",
    "Due to unforeseen circumstances the event has been postponed until further notice.",
    "I really enjoyed the hotel, but the breakfast was disappointing.",
    "The library will be closed on Monday for repairs.",
]

PASSAGES = [
    "Bees are important pollinators. Without them, many fruits and vegetables would be harder to grow. In recent "
    "years, bee populations have declined because of pesticides, disease and loss of habitat.",
    "The company reported higher profits this year. Sales grew in Asia and Europe, while costs fell thanks to a "
    "new factory. The board plans to hire 300 people next year.",
    "Walking for thirty minutes a day can improve heart health, mood and sleep. It needs no equipment and can be "
    "done almost anywhere, which makes it one of the easiest habits to start.",
    "The town council voted to close the main street to cars on weekends. Shop owners are divided: some expect "
    "more visitors on foot, others worry that customers will not find parking.",
    "Octopuses have three hearts and blue blood. They can change colour in less than a second and are known for "
    "escaping from aquarium tanks.",
]

TEXT_TASKS = [
    "Rewrite this sentence to sound more formal: {x}", "Correct the spelling and grammar: {x}",
    "Translate into French: {x}", "Translate into Spanish: {x}", "Is this sentence positive, negative or neutral? {x}",
    "Make this sentence shorter: {x}", "Rewrite this in a friendly tone: {x}",
]

PASSAGE_TASKS = ["Summarize this in one sentence: {x}", "Write three questions about this text: {x}",
                 "What is the main idea of this paragraph? {x}", "Give this paragraph a title: {x}",
                 "Rewrite this for a ten-year-old: {x}"]

SYSTEM_PROMPTS = [
    "You are a concise assistant. Answer in a few sentences.", "You are a friendly tutor who explains step by step.",
    "You are a helpful assistant.", "You are an expert cook.", "You are a travel agent.",
    "Answer as a bulleted list.", "You are a patient teacher for beginners.",
]


def _numbers(rng: random.Random) -> list[str]:
    """Word problems and arithmetic with seeded numbers (the target's answers to these are step-by-step)."""
    out = []
    for _ in range(60):
        a, b, c = rng.randint(2, 90), rng.randint(2, 12), rng.randint(10, 500)
        out += [
            f"If a train travels {a * b} km in {b} hours, what is its average speed?",
            f"What is {rng.choice([5, 10, 15, 20, 25, 30, 40, 75])} percent of {c}?",
            f"A jacket costs ${c} and is {rng.choice([10, 15, 20, 25, 30, 50])}% off. What is the sale price?",
            f"Solve for x: {b}x + {a} = {a + b * rng.randint(1, 20)}.",
            f"I have {c} apples and give away {a}. Then I buy {b} bags of {b} apples. How many do I have now?",
            f"How many minutes are there in {b} hours and {a} minutes?",
            f"What is the area of a rectangle that is {a} cm long and {b} cm wide?",
            f"If I save ${a} a week, how long until I have ${c * 10}?",
        ]
    return out


def _everyday_families(rng: random.Random) -> list[list[str]]:
    """The everyday families, each a list of prompts (see GOALS above)."""
    cities = PLACES
    return [
        [f"How do I {g}?" for g in GOALS] + [f"Any tips to help me {g}?" for g in GOALS]
        + [f"What's the best way to {g}?" for g in GOALS],
        [f"{s[0].upper() + s[1:]}. What should I do?" for s in SITUATIONS]
        + [f"{s[0].upper() + s[1:]}. Any advice?" for s in SITUATIONS],
        [f"What causes {p}?" for p in PHENOMENA] + [f"Why does {p} happen? Explain it simply." for p in PHENOMENA],
        [f"How does {d} work?" for d in DEVICES] + [f"Explain how {d} works in a few sentences." for d in DEVICES],
        [f"Give me a simple recipe for {d}." for d in DISHES] + [f"How do I make {d}?" for d in DISHES]
        + [f"What can I cook with {a} and {b}?" for a, b in zip(INGREDIENTS, INGREDIENTS[3:] + INGREDIENTS[:3])]
        + [f"How should I cook {i} so it tastes good?" for i in INGREDIENTS],
        [f"I'm visiting {p} for {n} days. What should I see?" for p, n in zip(cities, itertools.cycle([2, 3, 4, 5]))]
        + [f"What's the best time of year to visit {p}?" for p in cities]
        + [f"What food should I try in {p}?" for p in cities]
        + [f"What should I pack for {t}?" for t in TRIPS] + [f"Give me tips for {t}." for t in TRIPS],
        [f"Write a short email to {who} {why}." for who, why in LETTERS]
        + [f"Write a polite message to {who} {why}." for who, why in LETTERS],
        [f"Write {f} about {s}." for f, s in zip(itertools.cycle(POEM_FORMS), POEM_SUBJECTS * 3)],
        [f"Tell me a short story about {c} who {p}." for c in CHARACTERS for p in PLOTS],
        [f"What is the difference between {a} and {b}?" for a, b in PAIRS]
        + [f"What does {t} mean?" for t in TERMS] + [f"Explain {t} with an everyday example." for t in TERMS],
        [f"Who was {p}?" for p in PEOPLE] + [f"Why is {p} famous?" for p in PEOPLE]
        + [f"What happened during {h}?" for h in HISTORY] + [f"Why was {h} important?" for h in HISTORY],
        [f"What's a good gift for {g}?" for g in GIFTS] + [f"Suggest some {i}." for i in IDEAS]
        + [f"Give me a list of {i}." for i in IDEAS],
        [f"Is it bad to {h}?" for h in HABITS] + [f"What are the benefits of {a}?" for a in ACTIVITIES]
        + [f"How do I {m}?" for m in MONEY],
        [f"How do I {h}?" for h in HOME] + [f"How do I {w}?" for w in WORK],
        [f"What are the pros and cons of {c}?" for c in CHOICES]
        + [f"Should I {a} or {b}?" for a, b in DECISIONS],
        _numbers(rng),
        [t.format(x=x) for t in TEXT_TASKS for x in SENTENCES] + [t.format(x=x) for t in PASSAGE_TASKS for x in PASSAGES],
    ]


SQL_TASKS = ["finds customers who placed more than three orders", "lists the ten most expensive products",
             "computes the average order value per month", "deletes duplicate rows from a table",
             "joins users with their addresses", "raises the price of every item in one category by 10%",
             "finds employees who earn more than their manager", "counts new sign-ups per day",
             "finds products that were never ordered", "returns the top three scores per class"]

SHELL_TASKS = ["finds all .log files changed in the last day", "prints the ten largest files in a folder",
               "replaces a word in every .txt file", "counts the unique IP addresses in an access log",
               "backs up a folder into a dated tar.gz archive", "stops a process by its name",
               "checks every minute whether a website is up", "shows which process is using port 8080",
               "downloads a file and checks its sha256", "lists the git branches merged into main"]

ERRORS = ["TypeError: 'NoneType' object is not subscriptable", "KeyError: 'name'",
          "ModuleNotFoundError: No module named 'requests'", "RecursionError: maximum recursion depth exceeded",
          "ValueError: invalid literal for int() with base 10: 'abc'",
          "UnboundLocalError: local variable 'count' referenced before assignment",
          "TypeError: can only concatenate str (not \"int\") to str",
          "AttributeError: 'list' object has no attribute 'split'",
          "Uncaught TypeError: Cannot read properties of undefined (reading 'length')",
          "IndexError: list index out of range", "FileNotFoundError: [Errno 2] No such file or directory: 'data.txt'",
          "fatal: refusing to merge unrelated histories", "segmentation fault (core dumped)"]

BUGGY = ["def is_even(n): return n % 2 == 1",
         "def contains(items, target):\n    for x in items:\n        if x == target:\n            return True\n        else:\n            return False",
         "let total = 0; for (let i = 0; i <= arr.length; i++) { total += arr[i]; }",
         "x = input('Number: ')\nprint(x * 2)",
         "nums = [3, 1, 2]\nsorted_nums = nums.sort()\nprint(sorted_nums[0])",
         "def greet(name):\n    print('Hello ' + name)\n\nprint(greet('Ann').upper())",
         "count = 0\ndef bump():\n    count += 1",
         "for key in d:\n    if d[key] == 0:\n        del d[key]",
         "if (user.age > 18) { canVote = true }\nconsole.log(canVote)",
         "with open('out.txt') as f:\n    f.write('done')"]

ALGORITHMS = ["merge sort", "quicksort", "breadth-first search", "depth-first search", "Dijkstra's algorithm",
              "a binary search tree", "dynamic programming", "a hash map", "a heap", "memoization", "a trie"]

LIBRARY_TASKS = [("pandas", "read a CSV file and keep rows where a column is above 10"),
                 ("requests", "send a POST request with a JSON body"), ("datetime", "add 30 days to a date"),
                 ("collections.Counter", "count words in a text"), ("pathlib", "list all files in a folder"),
                 ("argparse", "add a --verbose flag"), ("json", "pretty-print a dictionary"),
                 ("re", "find all numbers in a string"), ("itertools", "get every pair of items from a list"),
                 ("subprocess", "run a shell command and read its output"), ("logging", "write logs to a file"),
                 ("sqlite3", "create a table and insert rows"), ("unittest", "test that a function raises an error"),
                 ("matplotlib", "plot a simple line chart"), ("numpy", "compute the mean of each column"),
                 ("asyncio", "run three downloads at the same time"), ("dataclasses", "define a small record type")]

WEB_TASKS = ["an HTML form with name and email fields and a submit button", "CSS that centers a box on the page",
             "a responsive navigation bar in HTML and CSS", "a JavaScript function that validates a password field",
             "a small Flask app with one JSON endpoint", "an Express.js route that returns a list of users",
             "a React component that shows a counter with a button", "a CSS grid with three equal columns"]


def _topic_families() -> list[list[str]]:
    pairs = list(zip(TOPICS, TOPICS[7:] + TOPICS[:7]))
    return [[tpl.format(t=t, u=u) for tpl in CHAT_TEMPLATES for t, u in pairs],
            [tpl.format(s=s) for tpl in SKILL_TEMPLATES for s in SKILLS]
            + [tpl.format(e=e) for tpl in EVENT_TEMPLATES for e in EVENTS]]


def _code_families() -> list[list[str]]:
    return [
        [f"Write a {lang} function that {task}." for lang, task in itertools.product(LANGUAGES, CODE_TASKS)]
        + [f"Write a Python class for {c}." for c in CODE_CLASSES],
        [f"How do I {h} in {lang}?" for h, lang in itertools.product(HOWTO, LANGUAGES[:4])]
        + [f"How do I use {lib} to {t}?" for lib, t in LIBRARY_TASKS]
        + [f"Show me how to {t} in Python with {lib}." for lib, t in LIBRARY_TASKS],
        [f"Explain {c} with a short code example." for c in CONCEPTS]
        + [f"What does this code do? {s}" for s in SNIPPETS]
        + [f"Explain how {a} works and give its time complexity." for a in ALGORITHMS]
        + [f"Implement {a} in Python." for a in ALGORITHMS],
        [f"Write a docstring and type hints for a Python function that {t}." for t in CODE_TASKS]
        + [f"Write unit tests for a Python function that {t}." for t in CODE_TASKS],
        [f"Write an SQL query that {t}." for t in SQL_TASKS]
        + [f"Write a bash command that {t}." for t in SHELL_TASKS]
        + [f"How do I do this from the Linux command line: one that {t}?" for t in SHELL_TASKS[:4]]
        + [f"Write {w}." for w in WEB_TASKS],
        [f"What does this error mean and how do I fix it? {e}" for e in ERRORS]
        + [f"I get this error: {e}. Why?" for e in ERRORS]
        + [f"Find the bug in this code:\n{c}" for c in BUGGY] + [f"Why does this code not work?\n{c}" for c in BUGGY],
    ]


def _round_robin(families: list[list[str]], rng: random.Random) -> list[str]:
    """Each family shuffled, then drawn one prompt per family in turn (a family that runs out drops out)."""
    shuffled = [rng.sample(f, len(f)) for f in families if f]
    out, seen = [], set()
    for group in itertools.zip_longest(*shuffled):
        for p in group:
            if p is not None and p not in seen:
                seen.add(p)
                out.append(p)
    return out


def pretrain_prompts(n: int | None = None, seed: int = 0) -> list[list[dict]]:
    """``n`` distinct chat prompts (all when None), chat and code interleaved half and half, each side drawing
    its template families in turn, in a seeded order: a run that makes fewer answers still covers every kind of
    text. One chat prompt in six comes with a system prompt, as many clients send one."""
    rng = random.Random(seed)
    chat = _round_robin(_topic_families() + _everyday_families(rng), rng)
    code = _round_robin(_code_families(), rng)
    order = [x for pair in itertools.zip_longest([(p, True) for p in chat], [(p, False) for p in code])
             for x in pair if x is not None]
    out = []
    for p, is_chat in order[:n]:
        msgs = [{"role": "user", "content": p}]
        if is_chat and rng.random() < 1 / 6:
            msgs.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        out.append(msgs)
    return out
