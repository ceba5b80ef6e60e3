"""Generate the small sample corpus shipped in assets/samples/.

Four domains like the Swallow mixture (Japanese, English, Python code, math),
each written as JSONL records ``{"text": ...}`` with a train and a held-out
validation file. The text is produced here from templates and a seeded RNG,
so the corpus is ours, deterministic, and has enough structure for a tiny
model's loss to fall within a minute on a CPU.

    python scripts/make_sample_data.py [--out assets/samples] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

JA_SUBJECTS = [
    "私", "彼", "彼女", "先生", "学生たち", "研究者", "母", "父", "友達", "店長",
    "エンジニア", "子どもたち", "医者", "作家", "料理人", "猫", "犬", "市長",
]
JA_PLACES = [
    "東京", "大阪", "京都", "札幌", "福岡", "名古屋", "横浜", "神戸", "図書館",
    "公園", "駅", "大学", "病院", "市場", "海辺", "山の上", "研究所", "喫茶店",
]
JA_OBJECTS = [
    "本", "手紙", "論文", "写真", "料理", "地図", "新聞", "花", "コーヒー",
    "計算機", "傘", "時計", "ノート", "絵", "音楽", "野菜", "果物", "資料",
]
JA_VERBS = [
    ("読みました", "読む"), ("書きました", "書く"), ("買いました", "買う"),
    ("見ました", "見る"), ("作りました", "作る"), ("届けました", "届ける"),
    ("探しました", "探す"), ("調べました", "調べる"), ("選びました", "選ぶ"),
]
JA_TIMES = [
    "昨日", "今朝", "先週", "去年の夏", "毎朝", "週末に", "夕方", "三日前に",
    "春になると", "雨の日には",
]
JA_ADJ = [
    "静かな", "大きな", "新しい", "古い", "美しい", "にぎやかな", "小さな",
    "有名な", "便利な", "不思議な",
]
JA_REASONS = [
    "天気が良かったので", "時間があったので", "仕事が早く終わったので",
    "友達に勧められたので", "興味があったので", "必要だったので",
]


def japanese(rng: random.Random) -> str:
    sentences = []
    topic = rng.choice(JA_PLACES)
    sentences.append(f"{rng.choice(JA_ADJ)}{topic}についての話です。")
    for _ in range(rng.randint(3, 8)):
        kind = rng.random()
        s, o, p = rng.choice(JA_SUBJECTS), rng.choice(JA_OBJECTS), rng.choice(JA_PLACES)
        past, plain = rng.choice(JA_VERBS)
        if kind < 0.35:
            sentences.append(f"{rng.choice(JA_TIMES)}、{s}は{p}で{o}を{past}。")
        elif kind < 0.6:
            sentences.append(
                f"{rng.choice(JA_REASONS)}、{s}は{rng.choice(JA_ADJ)}{p}へ行って{o}を{past}。"
            )
        elif kind < 0.8:
            n = rng.randint(2, 12)
            sentences.append(f"{s}は{o}を{n}つ{past}が、まだ足りないと言いました。")
        else:
            sentences.append(f"{p}では、{o}を{plain}人が多いそうです。")
    return "".join(sentences)


EN_SUBJECTS = [
    "The researcher", "My neighbour", "A young engineer", "The old captain",
    "Our teacher", "The committee", "A curious student", "The baker",
    "The city council", "A travelling musician", "The librarian", "The team",
]
EN_VERBS = [
    "studied", "described", "repaired", "measured", "painted", "discovered",
    "organised", "questioned", "built", "visited", "explained", "recorded",
]
EN_OBJECTS = [
    "the river delta", "an ancient map", "the new bridge", "a quiet garden",
    "the harbour lights", "a mountain village", "the school library",
    "a broken clock", "the summer festival", "a rare orchid", "the train schedule",
]
EN_CLAUSES = [
    "before the rain started", "after a long discussion", "with great care",
    "for the first time", "despite the cold wind", "early in the morning",
    "during the holidays", "without any help", "as the sun went down",
]
EN_OPENERS = [
    "Everyone agreed that", "It is often said that", "According to the report,",
    "Later that year,", "In the end,", "Surprisingly,", "Meanwhile,",
]


def english(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 8)):
        kind = rng.random()
        s, v, o, c = (
            rng.choice(EN_SUBJECTS),
            rng.choice(EN_VERBS),
            rng.choice(EN_OBJECTS),
            rng.choice(EN_CLAUSES),
        )
        if kind < 0.5:
            sentences.append(f"{s} {v} {o} {c}.")
        elif kind < 0.75:
            sentences.append(f"{rng.choice(EN_OPENERS)} {s.lower()} {v} {o}.")
        else:
            n = rng.randint(2, 40)
            sentences.append(f"{s} {v} {n} details about {o} and wrote them down {c}.")
    return " ".join(sentences)


CODE_NOUNS = ["item", "value", "record", "point", "order", "word", "score", "node"]
CODE_OPS = [
    ("sum", "total = 0\n    for {x} in {xs}:\n        total += {x}\n    return total"),
    ("max", "best = {xs}[0]\n    for {x} in {xs}[1:]:\n        if {x} > best:\n            best = {x}\n    return best"),
    ("count_positive", "return sum(1 for {x} in {xs} if {x} > 0)"),
    ("squares", "return [{x} * {x} for {x} in {xs}]"),
    ("even", "return [{x} for {x} in {xs} if {x} % 2 == 0]"),
    ("mean", "if not {xs}:\n        return 0.0\n    return sum({xs}) / len({xs})"),
    ("reverse", "return list(reversed({xs}))"),
    ("unique", "seen = set()\n    out = []\n    for {x} in {xs}:\n        if {x} not in seen:\n            seen.add({x})\n            out.append({x})\n    return out"),
]


def code(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 3)):
        noun = rng.choice(CODE_NOUNS)
        op, body = rng.choice(CODE_OPS)
        xs, x = f"{noun}s", noun
        name = f"{op}_of_{xs}"
        parts.append(
            f"def {name}({xs}: list[int]):\n"
            f'    """Return the {op.replace("_", " ")} of the given {xs}."""\n'
            f"    {body.format(x=x, xs=xs)}\n"
        )
        values = [rng.randint(-9, 30) for _ in range(rng.randint(3, 7))]
        parts.append(f"print({name}({values}))\n")
    if rng.random() < 0.4:
        cls = rng.choice(["Counter", "Stack", "Queue", "Buffer"])
        parts.append(
            f"class {cls}:\n"
            f"    def __init__(self):\n        self.items = []\n\n"
            f"    def push(self, x):\n        self.items.append(x)\n\n"
            f"    def __len__(self):\n        return len(self.items)\n"
        )
    return "\n\n".join(parts)


def math(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return (
            f"Problem: A shop sells {a} apples in the morning and {b} apples in the "
            f"afternoon. How many apples does it sell in total?\n"
            f"Solution: We add the two amounts: {a} + {b} = {a + b}. "
            f"The answer is {a + b}."
        )
    if kind == 1:
        x, m, c = rng.randint(1, 20), rng.randint(2, 9), rng.randint(1, 50)
        return (
            f"Problem: Solve for $x$: ${m}x + {c} = {m * x + c}$.\n"
            f"Solution: Subtract {c} from both sides: ${m}x = {m * x}$. "
            f"Divide by {m}: $x = {x}$. The answer is {x}."
        )
    if kind == 2:
        w, h = rng.randint(2, 30), rng.randint(2, 30)
        return (
            f"問題: 縦{h}cm、横{w}cmの長方形の面積を求めなさい。\n"
            f"解答: 面積は縦×横なので、{h} × {w} = {h * w}。答えは{h * w}平方センチメートルです。"
        )
    n = rng.randint(3, 12)
    return (
        f"Problem: Compute the sum $1 + 2 + \\cdots + {n}$.\n"
        f"Solution: The sum of the first $n$ integers is $n(n+1)/2$. "
        f"With $n = {n}$ this is ${n} \\cdot {n + 1} / 2 = {n * (n + 1) // 2}$. "
        f"The answer is {n * (n + 1) // 2}."
    )


DOMAINS: dict[str, tuple[Callable[[random.Random], str], int, int]] = {
    # name: (generator, train documents, validation documents)
    "ja": (japanese, 1200, 60),
    "en": (english, 1200, 60),
    "code": (code, 500, 40),
    "math": (math, 1500, 60),
}


def write_jsonl(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("assets/samples"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    (args.out / "val").mkdir(parents=True, exist_ok=True)
    for i, (name, (generate, n_train, n_val)) in enumerate(DOMAINS.items()):
        rng = random.Random(args.seed * 1000 + i)
        write_jsonl(args.out / f"{name}.jsonl", [generate(rng) for _ in range(n_train)])
        write_jsonl(args.out / "val" / f"{name}.jsonl", [generate(rng) for _ in range(n_val)])
        print(f"wrote {name}: {n_train} train, {n_val} validation documents")


if __name__ == "__main__":
    main()
