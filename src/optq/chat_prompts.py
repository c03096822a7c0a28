"""Built-in user prompts for the quality report's `chat` domain (and chat-formatted calibration).

Written for optq. Each entry is (prompt, key): `key` is the word a right answer contains (compared
case-insensitively), or None where the answer is open (instructions, code, prose). The mix: factual
questions, arithmetic, short translations, code, instructions and open questions.
"""

from __future__ import annotations

CHAT_PROMPTS: tuple[tuple[str, str | None], ...] = (
    # factual questions with a key word
    ("What is the capital of France? Answer in one sentence.", "Paris"),
    ("What is the capital of Japan? Answer in one sentence.", "Tokyo"),
    ("What is the capital of Italy? Answer in one sentence.", "Rome"),
    ("What is the capital of Germany? Answer in one sentence.", "Berlin"),
    ("What is the capital of Spain? Answer in one sentence.", "Madrid"),
    ("What is the capital of Egypt? Answer in one sentence.", "Cairo"),
    ("What is the capital of Canada? Answer in one sentence.", "Ottawa"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the chemical symbol for gold?", "Au"),
    ("What gas do plants absorb from the air for photosynthesis?", "carbon dioxide"),
    ("How many days are there in a week?", "seven"),
    ("How many continents are there on Earth?", "seven"),
    ("Who wrote the play Romeo and Juliet?", "Shakespeare"),
    ("Who painted the Mona Lisa?", "Leonardo"),
    ("What is the freezing point of water in degrees Celsius?", "0"),
    ("What is the boiling point of water at sea level in degrees Celsius?", "100"),
    ("Which ocean is the largest?", "Pacific"),
    ("What is the longest river in Africa?", "Nile"),
    ("What language is mainly spoken in Brazil?", "Portuguese"),
    ("What is the tallest mountain in the world?", "Everest"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("What is the main ingredient of guacamole?", "avocado"),
    ("What do bees make?", "honey"),
    ("What is the opposite of 'hot'?", "cold"),
    ("What color do you get by mixing blue and yellow?", "green"),
    ("Which star is at the center of our solar system?", "Sun"),
    ("What is H2O commonly called?", "water"),
    ("How many legs does a spider have?", "eight"),
    ("What is the currency of Japan?", "yen"),
    ("In which country are the pyramids of Giza?", "Egypt"),
    ("What is the square root of 81?", "9"),
    ("Which organ pumps blood through the human body?", "heart"),
    ("What is the first letter of the English alphabet?", "A"),
    ("Which month comes after March?", "April"),
    ("What is the plural of 'mouse'?", "mice"),
    ("Who was the first person to walk on the Moon?", "Armstrong"),
    ("What is the fastest land animal?", "cheetah"),
    ("What is frozen water called?", "ice"),
    ("Which programming language is named after a comedy group, Monty Python?", "Python"),
    # arithmetic with a key answer
    ("What is 7 plus 5?", "12"),
    ("What is 9 times 6?", "54"),
    ("What is 100 minus 37?", "63"),
    ("What is 144 divided by 12?", "12"),
    ("What is 15 plus 27?", "42"),
    ("What is 8 times 8?", "64"),
    ("What is half of 50?", "25"),
    ("What is 3 squared?", "9"),
    ("If I have 10 apples and eat 3, how many are left?", "7"),
    ("What is 20 percent of 200?", "40"),
    # short translations with a key word
    ("Translate 'thank you' into French.", "merci"),
    ("Translate 'good morning' into Spanish.", "buenos"),
    ("Translate 'cat' into German.", "Katze"),
    ("Translate 'water' into Spanish.", "agua"),
    ("Translate 'house' into French.", "maison"),
    ("Translate 'hello' into Italian.", "ciao"),
    ("Translate 'book' into French.", "livre"),
    ("Translate 'dog' into Spanish.", "perro"),
    ("Translate 'friend' into Spanish.", "amigo"),
    ("Translate 'yes' into German.", "ja"),
    # code
    ("Write a Python function that returns the sum of a list of numbers.", None),
    ("Write a Python function that checks whether a string is a palindrome.", None),
    ("Write a Python one-liner that reverses a string s.", None),
    ("How do I read a text file line by line in Python?", None),
    ("Write a SQL query that selects all rows from a table named users.", None),
    ("What does the len() function do in Python?", None),
    ("Write a Python function that returns the factorial of n.", None),
    ("Explain what a for loop is in programming.", None),
    ("Write a JavaScript function that adds two numbers.", None),
    ("How do you create an empty dictionary in Python?", None),
    ("What is the difference between a list and a tuple in Python?", None),
    ("Write a Python function that returns the largest number in a list.", None),
    ("Write a bash command that counts the lines of a file named data.txt.", None),
    ("What is recursion? Give a short example.", None),
    ("Write a Python loop that prints the numbers from 1 to 5.", None),
    # instructions and writing
    ("Give me three tips for sleeping better.", None),
    ("Write a haiku about the ocean.", None),
    ("Summarize the plot of Cinderella in two sentences.", None),
    ("Write a short thank-you note to a teacher.", None),
    ("List three fruits that are red.", None),
    ("Suggest a name for a friendly robot.", None),
    ("Write one sentence describing autumn.", None),
    ("Give me a simple recipe for scrambled eggs.", None),
    ("Write a polite email asking to reschedule a meeting.", None),
    ("Describe a cat to someone who has never seen one.", None),
    ("Give two reasons why exercise is healthy.", None),
    ("Write a short motivational quote.", None),
    ("Explain how to make a cup of tea.", None),
    ("List the days of the week.", None),
    ("Write a two-line poem about the moon.", None),
    # open questions and explanations
    ("Why is the sky blue?", None),
    ("How do airplanes stay in the air?", None),
    ("What is photosynthesis?", None),
    ("Why do we have seasons on Earth?", None),
    ("What causes rain?", None),
    ("What is the difference between weather and climate?", None),
    ("Explain gravity to a child.", None),
    ("What is a computer virus?", None),
    ("Why do leaves change color in autumn?", None),
    ("What is machine learning, in simple terms?", None),
    ("How does a refrigerator keep food cold?", None),
    ("What are the benefits of reading books?", None),
    ("Why is it important to drink water?", None),
    ("What is democracy?", None),
    ("How do vaccines work?", None),
)


# Calibration prompts (the chat part of the default calibration, answered by the float model itself): a
# separate list, so that the report's chat domain scores prompts the checkpoint was not calibrated on
# (tests/test_calibration_mix.py checks that the two share no prompt).
_EXPLAIN = ("volcanoes", "tides", "rainbows", "earthquakes", "the water cycle", "black holes", "electricity",
            "magnets", "the immune system", "inflation", "compound interest", "the internet", "encryption",
            "recycling", "bees and pollination", "the stock market", "solar panels", "clouds", "sleep",
            "muscles", "batteries", "the printing press", "glaciers", "coral reefs", "thunder", "fermentation",
            "a binary search", "recursion", "a hash table", "version control")
_CODE = ("counts the words of a text file", "checks whether a number is prime", "groups words by their first letter",
         "counts the vowels in a word", "merges two sorted lists", "parses a date written as YYYY-MM-DD",
         "removes duplicates from a list", "converts Celsius to Fahrenheit", "reads a file and counts its lines",
         "checks whether two words are anagrams", "returns the n-th Fibonacci number",
         "sorts a list of dictionaries by a key", "flattens a nested list", "capitalizes every word of a sentence",
         "computes the average of a list of numbers", "finds the second smallest number in a list")
_LANGUAGES = ("French", "Spanish", "German", "Italian", "Portuguese")
_PHRASES = ("Where is the train station?", "I would like a glass of water.", "The weather is nice today.",
            "My brother works in a hospital.", "We are going to the beach tomorrow.", "This book is very interesting.")
_WRITE = ("a haiku about a mountain village", "a short story about a lost key in three sentences",
          "a tweet announcing a bake sale", "a limerick about a cat", "a product description for a water bottle",
          "a birthday message for a friend", "an apology for arriving late", "a riddle and its answer",
          "a slogan for a library", "two sentences about a rainy morning", "a short cover letter opening",
          "a packing list for a weekend camping trip", "a dialogue between a dog and a cat in four lines",
          "a short review of an imaginary restaurant")
_ASK = ("Which river flows through Budapest?", "Who discovered penicillin?",
        "What is the capital of Australia?", "How many bones are in the adult human body?",
        "Which language has the most native speakers?", "Who composed the Four Seasons concertos?",
        "What is the hardest natural substance?", "What is the cube root of 64?",
        "Which element has the chemical symbol O?", "How many minutes are in two hours?",
        "What is the smallest prime number?", "Which country is famous for the maple leaf flag?",
        "Which grain is used to make risotto?", "In which year did World War II end?",
        "What instrument has 88 keys?", "Which currency do people use in Sweden?")
_ADVICE = ("How can I sleep better?", "How do I start learning to play the guitar?",
           "What should I pack for a day hike?", "How can I save money on groceries?",
           "How do I prepare for a job interview?", "What are good habits for studying?",
           "How do I keep houseplants alive?", "How can I be more productive in the morning?",
           "How do I write a good resume?", "What is a healthy breakfast?")


def _calibration_prompts() -> tuple[str, ...]:
    out = [f"Explain {t} in a few sentences." for t in _EXPLAIN]
    out += [f"Write a Python function that {t}." for t in _CODE]
    out += [f"Translate into {lang}: \"{p}\"" for i, p in enumerate(_PHRASES) for lang in _LANGUAGES[i % 2::2]]
    out += [f"Write {t}." for t in _WRITE]
    out += list(_ASK) + list(_ADVICE)
    out += [f"Calculate {a} {op} {b} and explain briefly." for a, op, b in (
        (23, "plus", 58), (156, "divided by", 13), (17, "times", 6), (1000, "minus", 387), (9, "squared plus", 19),
        (45, "percent of", 200))]
    out += [f"A shop sells pens at {p} cents each. How much do {n} pens cost? Show your steps."
            for p, n in ((35, 4), (12, 9), (80, 3))]
    return tuple(out)


CALIBRATION_PROMPTS: tuple[str, ...] = _calibration_prompts()
