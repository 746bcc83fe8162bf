"""Generate the bundled demo dataset: extract a person's facts from one sentence into a fixed JSON record.

The base model can read the sentence but does not know the exact output format (keys, order, types, no prose),
so exact match measures what fine-tuning taught. Held-out rows use names, cities and two sentence templates never
seen in training. Deterministic: `python data/demo/generate.py` rewrites the same files."""

import json
import random
from pathlib import Path

FIRST = [
    "Maria",
    "John",
    "Aisha",
    "Kenji",
    "Lena",
    "Omar",
    "Sofia",
    "Lucas",
    "Priya",
    "Noah",
    "Elena",
    "Tariq",
    "Chloe",
    "Mateo",
    "Ingrid",
    "Samuel",
    "Yara",
    "Felix",
    "Hana",
    "Diego",
    "Nora",
    "Ivan",
    "Leila",
    "Oscar",
    "Mei",
    "Ruth",
]
LAST = [
    "Lopez",
    "Smith",
    "Khan",
    "Tanaka",
    "Fischer",
    "Haddad",
    "Rossi",
    "Martin",
    "Patel",
    "Brown",
    "Petrova",
    "Aziz",
    "Dubois",
    "Garcia",
    "Larsen",
    "Okafor",
    "Silva",
    "Weber",
    "Kim",
    "Moreno",
    "Novak",
    "Sato",
    "Cohen",
    "Berg",
]
CITIES = [
    "Lisbon",
    "Toronto",
    "Nairobi",
    "Osaka",
    "Berlin",
    "Cairo",
    "Milan",
    "Lyon",
    "Mumbai",
    "Boston",
    "Prague",
    "Dublin",
    "Seville",
    "Oslo",
    "Lagos",
    "Seoul",
    "Porto",
    "Denver",
    "Vienna",
    "Lima",
    "Quito",
    "Perth",
]
JOBS = [
    "nurse",
    "teacher",
    "pilot",
    "chef",
    "engineer",
    "lawyer",
    "farmer",
    "painter",
    "dentist",
    "plumber",
    "librarian",
    "architect",
    "baker",
    "journalist",
    "pharmacist",
    "mechanic",
    "designer",
    "electrician",
]
TEMPLATES = [
    "{name} is {age} and works as {a_job} in {city}.",
    "Meet {name}, a {age}-year-old {job} living in {city}.",
    "{name}, aged {age}, is {a_job} based in {city}.",
    "In {city} lives {name}, who is {age} years old and works as {a_job}.",
    "Our new {job} is {name} from {city}; {name_first} turned {age} this year.",
    "{name} ({age}) has been {a_job} in {city} for years.",
]
HELD_OUT_TEMPLATES = [
    "After moving to {city}, {name} found work as {a_job} at the age of {age}.",
    "{name} is {a_job}. {name_first} is {age} and calls {city} home.",
]
INSTRUCTION = "Extract the person's name, age, job and city as JSON."


def example(rng, firsts, lasts, cities, templates):
    first, last = rng.choice(firsts), rng.choice(lasts)
    record = {"name": f"{first} {last}", "age": rng.randint(19, 78), "job": rng.choice(JOBS), "city": rng.choice(cities)}
    a_job = ("an " if record["job"][0] in "aeiou" else "a ") + record["job"]
    sentence = rng.choice(templates).format(name_first=first, a_job=a_job, **record)
    return {
        "messages": [
            {"role": "user", "content": f"{INSTRUCTION}\n{sentence}"},
            {"role": "assistant", "content": json.dumps(record)},
        ]
    }


def main():
    rng = random.Random(1234)
    here = Path(__file__).parent
    split = {"first": 20, "last": 18, "city": 16}
    train = [example(rng, FIRST[: split["first"]], LAST[: split["last"]], CITIES[: split["city"]], TEMPLATES) for _ in range(400)]
    held = [
        example(rng, FIRST[split["first"] :], LAST[split["last"] :], CITIES[split["city"] :], TEMPLATES + HELD_OUT_TEMPLATES)
        for _ in range(24)
    ]
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held)):
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
