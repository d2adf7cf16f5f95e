"""Generated corpora with planted cases, for tests and benchmarks: every document says what it is.

Each row has `text`, `id` and `kind` (unique | exact_dup | near_dup | non_english | boilerplate |
contaminated | pii), plus `source` (the id a copy was made from) and `edit_rate` for near-dups.
"""
from __future__ import annotations

import random
import re

NOUNS = """time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government number night
point home water room mother area money story fact month lot right study book eye job word business issue
side kind head house service friend father power hour game line end member law car city community name
president team minute idea kid body information back parent face others level office door health person
art war history party result change morning reason research girl guy moment air teacher force education
foot boy age policy process music market sense nation plan college interest death experience effect class
control care field development role effort rate heart drug show leader light voice wife police mind price
report decision son view relationship town road arm difference value building action model season society
tax director position player record paper space ground form event official matter center couple site
project activity star table need court oil situation cost industry figure street image phone data picture
practice piece land product doctor wall patient worker news test movie north love support technology step
baby computer type attention film tree source organization hair window evidence population site garden
river bridge valley mountain island forest village harbor kitchen library museum theater station farmer
engine letter window ticket journey recipe blanket lantern basket pillow mirror ladder carpet""".split()
ADJECTIVES = """good new first last long great little own other old right big high different small large
next early young important few public bad same able late hard major better economic strong possible whole
free military true federal international full special easy clear recent certain personal open red difficult
available likely short single medical current wrong private past foreign fine common poor natural
significant similar hot dead central happy serious ready simple left physical general environmental
financial blue democratic dark various entire close legal religious cold final main green nice huge
popular traditional cultural quiet gentle bright narrow ancient curious careful brave clever honest
patient silent golden wooden empty crowded distant frozen hidden""".split()
VERBS = """asked built carried changed chose cleaned climbed collected counted covered crossed described
discovered dropped earned entered explained filled finished followed gathered helped joined kept learned
lifted listened moved noticed opened ordered painted passed picked planned planted played pulled pushed
reached read repaired returned saved searched showed signed sold started stopped studied taught touched
turned visited waited walked washed watched wrote""".split()
ADVERBS = """quickly slowly carefully quietly happily easily rarely often always sometimes yesterday today
later early together alone again finally suddenly gently nearly barely""".split()
PREPOSITIONS = "near behind under above beside across along around inside outside beyond toward".split()
SUBJECTS = "she he they we i our neighbor the old farmer my sister the teacher a young student".split(" ")
TEMPLATES = [
    "The {adj} {noun} {verb} the {noun2} {prep} the {adj2} {noun3}.",
    "{Subj} {verb} a {adj} {noun} and then {verb2} it {adv}.",
    "After the {noun} ended, the {adj} {noun2} {verb} {adv} {prep} the {noun3}.",
    "It was a {adj} {noun}, so {subj} {verb} the {noun2} with the {adj2} {noun3}.",
    "Every {noun} that {subj} {verb} had a {adj} {noun2} {prep} its {noun3}.",
    "When the {noun} {verb} the {adj} {noun2}, everyone {verb2} {adv}.",
    "{Subj} {adv} {verb} that the {noun} was more {adj} than the {noun2}.",
    "Because of the {adj} {noun}, the {noun2} {verb} {prep} the {adj2} {noun3} {adv}.",
]
FOREIGN = {
    "de": ("Der {a} {n} {v} heute mit dem {n2} durch den {a2} Wald, und die Kinder {v2} sehr {adv}.",
           dict(a="alte kleine große schöne neue dunkle ruhige freundliche".split(),
                n="Hund Mann Lehrer Bauer Nachbar Zug Vogel Bruder Arzt Koch".split(),
                v="ging fuhr lief wanderte sprach arbeitete spielte schrieb".split(),
                adv="glücklich leise schnell langsam fröhlich oft gern wirklich".split())),
    "fr": ("Le {a} {n} {v} avec le {n2} dans la {a2} maison, et les enfants {v2} très {adv}.",
           dict(a="vieux petit grand beau nouveau sombre calme gentil".split(),
                n="chien homme professeur paysan voisin train oiseau frère médecin cuisinier".split(),
                v="marchait parlait travaillait jouait écrivait chantait mangeait dormait".split(),
                adv="heureusement doucement vite lentement souvent vraiment bien toujours".split())),
    "es": ("El {a} {n} {v} con el {n2} por la {a2} ciudad, y los niños {v2} muy {adv}.",
           dict(a="viejo pequeño grande hermoso nuevo oscuro tranquilo amable".split(),
                n="perro hombre maestro campesino vecino tren pájaro hermano médico cocinero".split(),
                v="caminaba hablaba trabajaba jugaba escribía cantaba comía dormía".split(),
                adv="felizmente despacio rápido lentamente siempre realmente bien contentos".split())),
}
BOILERPLATE = ("We use cookies to improve your experience on this website and to show you relevant offers. "
               "By continuing to browse the site you agree to our use of cookies and our privacy policy. "
               "You can change your cookie settings at any time in the preferences panel below. "
               "Subscribe to our newsletter to receive weekly updates about new products and special deals.")


def sentence(rng: random.Random) -> str:
    subj = rng.choice(SUBJECTS)
    fill = dict(adj=rng.choice(ADJECTIVES), adj2=rng.choice(ADJECTIVES), noun=rng.choice(NOUNS),
                noun2=rng.choice(NOUNS), noun3=rng.choice(NOUNS), verb=rng.choice(VERBS), verb2=rng.choice(VERBS),
                adv=rng.choice(ADVERBS), prep=rng.choice(PREPOSITIONS), subj=subj, Subj=subj[0].upper() + subj[1:])
    return rng.choice(TEMPLATES).format(**fill).replace(" i ", " I ")


def english_doc(rng: random.Random, paragraphs: int = 4, sentences: int = 5) -> str:
    return "\n".join(" ".join(sentence(rng) for _ in range(sentences)) for _ in range(paragraphs))


def foreign_doc(rng: random.Random, lang: str, paragraphs: int = 4, sentences: int = 5) -> str:
    template, words = FOREIGN[lang]

    def one() -> str:
        return template.format(a=rng.choice(words["a"]), a2=rng.choice(words["a"]), n=rng.choice(words["n"]),
                               n2=rng.choice(words["n"]), v=rng.choice(words["v"]), v2=rng.choice(words["v"]),
                               adv=rng.choice(words["adv"]))
    return "\n".join(" ".join(one() for _ in range(sentences)) for _ in range(paragraphs))


def edit_words(text: str, rate: float, rng: random.Random) -> str:
    """Replaces each word with a random noun with probability `rate`, keeping line structure."""
    lines = []
    for line in text.split("\n"):
        words = line.split(" ")
        lines.append(" ".join(rng.choice(NOUNS) if rng.random() < rate else w for w in words))
    return "\n".join(lines)


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / max(1, len(sa | sb))


# --- PII ----------------------------------------------------------------------------------------
PII_CASES = {
    "email": ["jane.doe@example-mail.com", "k.smith+news@univ.edu", "admin@my-company.co.uk"],
    "ipv4": ["8.8.4.4", "34.117.59.81", "151.101.1.69"],
    "ipv6": ["2001:4860:4860::8844", "2606:4700:4700::1111", "2a00:1450:4001:82a::200e"],
    "phone": ["+1 415-555-0132", "(212) 555-0187", "+44 20 7946 0958", "650.555.0199"],
    "credit_card": ["4111 1111 1111 1111", "5500-0000-0000-0004", "340000000000009", "6011000990139424"],
    "iban": ["DE89 3704 0044 0532 0130 00", "GB82 WEST 1234 5698 7654 32", "FR1420041010050500013M02606"],
    "secret": ["AKIAIOSFODNN7EXAMPLE", "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
               "sk-proj-abcdEFGH1234ijklMNOP5678", "xoxb-123456789012-abcdefABCDEF",
               "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq8v1\n-----END RSA PRIVATE KEY-----"],
}
# Strings that look like PII and must survive scrubbing.
LOOKALIKES = ["version 1.2.3.4", "v2.10.3", "10.0.0.1", "192.168.1.20", "2023-01-15", "12/05/2023",
              "15.01.2023", "4111 1111 1111 1112", "ISBN 978-3-16-148410-0", "order 1234567890123",
              "12:30:45", "std::vector", "a[::2]", "user@localhost", "3.14159", "1,234,567",
              "DE89 3704 0044 0532 0130 01", "password: correcthorsebattery",
             # pass Luhn / parse as a public IPv4, told apart by structure and context
             "ISBN 978-0-7432-7356-5", "ISBN-13: 9780743273565", "9780306406157", "section 4.2.1.3",
             "§ 8.8.4.4", "see figure 3.1.4.1"]
PII_PLACEHOLDERS = {"email": "<EMAIL>", "ipv4": "<IPV4>", "ipv6": "<IPV6>", "phone": "<PHONE>",
                    "credit_card": "<CREDIT_CARD>", "iban": "<IBAN>", "secret": "<SECRET>"}


def pii_doc(rng: random.Random, kind: str, value: str, lookalike: str) -> str:
    intro = sentence(rng)
    return (f"{intro} Contact detail for the record: {value} was listed in the file.\n"
            f"{sentence(rng)} The reference {lookalike} also appears here. {sentence(rng)}")


# --- corpora ------------------------------------------------------------------------------------
def web_corpus(seed: int = 0, n_unique: int = 120, n_exact: int = 15,
               edit_rates: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.15),
               near_per_rate: int = 12, n_foreign: int = 30, n_boilerplate: int = 6,
               n_repetitive: int = 8, eval_rows: list[dict] | None = None, n_contaminated: int = 6) -> list[dict]:
    """A web-like corpus; base documents are unique English, the rest are planted copies/cases."""
    rng = random.Random(seed)
    rows: list[dict] = []
    base = [english_doc(rng) for _ in range(n_unique)]
    for i, text in enumerate(base):
        rows.append({"id": f"u{i}", "text": text, "kind": "unique"})
    for i in range(n_exact):
        src = rng.randrange(n_unique)
        rows.append({"id": f"x{i}", "text": base[src], "kind": "exact_dup", "source": f"u{src}"})
    sources = rng.sample(range(n_unique), len(edit_rates) * near_per_rate)
    for j, rate in enumerate(edit_rates):
        for k in range(near_per_rate):
            src = sources[j * near_per_rate + k]
            text = edit_words(base[src], rate, rng)
            rows.append({"id": f"n{j}_{k}", "text": text, "kind": "near_dup", "source": f"u{src}",
                         "edit_rate": rate, "jaccard": round(jaccard(text, base[src]), 4)})
    for i in range(n_foreign):
        lang = ("de", "fr", "es")[i % 3]
        rows.append({"id": f"f{i}", "text": foreign_doc(rng, lang), "kind": "non_english", "lang": lang})
    for i in range(n_boilerplate):
        rows.append({"id": f"b{i}", "text": english_doc(rng, paragraphs=3) + "\n" + BOILERPLATE,
                     "kind": "boilerplate"})
    for i in range(n_repetitive):
        line = sentence(rng)
        rows.append({"id": f"r{i}", "text": "\n".join([line] * 30), "kind": "repetitive"})
    for i, row in enumerate((eval_rows or [])[:n_contaminated]):
        text = english_doc(rng, paragraphs=2) + "\n" + row["question"] + " " + english_doc(rng, paragraphs=1)
        rows.append({"id": f"c{i}", "text": text, "kind": "contaminated"})
    rng.shuffle(rows)
    return rows


def eval_set(seed: int = 1, n: int = 20) -> list[dict]:
    rng = random.Random(seed)
    return [{"question": " ".join(sentence(rng) for _ in range(2)), "answer": rng.choice(NOUNS)} for _ in range(n)]


REFUSALS = ["As an AI language model, I cannot help with that request because it could be harmful to others "
            "and it goes against the guidelines I follow for every single conversation.",
            "I'm sorry, but I cannot provide that information since it would be irresponsible to share details "
            "that might put people at risk in any way whatsoever today.",
            "I can't assist with this task, as it involves content that is not appropriate and I must decline "
            "to produce anything that could mislead the people who read it."]


def instruction_corpus(seed: int = 0, n_good: int = 60) -> list[dict]:
    """SFT rows {instruction, response, kind}; kinds: good, short, long, stutter, refusal, similar, non_english."""
    rng = random.Random(seed)
    rows = []
    good_instr = []
    for i in range(n_good):
        instr = f"Explain how the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the " \
                f"{rng.choice(NOUNS)} {rng.choice(PREPOSITIONS)} the {rng.choice(NOUNS)} {rng.choice(ADVERBS)}."
        good_instr.append(instr)
        rows.append({"instruction": instr, "response": " ".join(sentence(rng) for _ in range(4)), "kind": "good"})
    for i in range(8):
        rows.append({"instruction": f"Name a {rng.choice(NOUNS)}.", "response": "A small red book.", "kind": "short"})
        rows.append({"instruction": f"Describe the {rng.choice(NOUNS)}.",
                     "response": " ".join(sentence(rng) for _ in range(60)), "kind": "long"})
        words = " ".join(sentence(rng) for _ in range(3)).split()
        words[5:5] = ["very"] * 4
        rows.append({"instruction": f"Tell me about the {rng.choice(NOUNS)} {i}.", "response": " ".join(words),
                     "kind": "stutter"})
        rows.append({"instruction": f"How do I break the {rng.choice(NOUNS)} {i}?", "response": REFUSALS[i % 3],
                     "kind": "refusal"})
        instr = good_instr[i]
        words = instr.split()
        words[-1] = "again."  # one word changed: Jaccard of word bigrams ~0.8-0.9 with the original
        rows.append({"instruction": " ".join(words), "response": " ".join(sentence(rng) for _ in range(4)),
                     "kind": "similar", "source": instr})
        rows.append({"instruction": f"Erkläre den {i}.", "response": foreign_doc(rng, "de", 1, 3),
                     "kind": "non_english"})
    rng.shuffle(rows)
    return rows
